"""Where rows come from: a recipe source -> the files it names -> raw rows, with their line numbers.

    files = resolve_files(source, "data.sources[0]")    # [Path, ...], or [] for a hub dataset id
    raw = load_file(path, source, "data.sources[0]")     # a datasets.Dataset of raw rows, plus ROW_COLUMN

A source is a file, a glob, a directory (every data file inside, recursively, in sorted order) or
a hub dataset id. Each file is read by `datasets` (Arrow, fast). Two things it cannot do are done
here: report *where* a bad row is, and keep going past one. So when `datasets` refuses a JSON file
(a malformed line, a value of the wrong type), the file is read again, JSON lines line by line, a
JSON array row by row, and every row is kept as its JSON text, to be parsed and judged one by one by
the pipeline (on_bad_row).

Before any JSON parser sees a file, `deep_json_lines` bounds how deeply its values nest: pyarrow's
reader recurses once per level and crashes the process (a segfault, at about 20,000 levels), and
the json module raises RecursionError (at about 1,000). Real rows nest a few levels (a conversation
with tool calls, 6 to 8), so anything past MAX_JSON_DEPTH is refused or skipped as a bad row before
it is parsed.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.util.memory import release_freed_memory

# File suffix -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

ROW_COLUMN = "__row"  # 1-based row (or, for .jsonl, line) number within its file
JSON_COLUMN = "__json"  # the row's JSON text, when the file had to be read line by line
BAD_COLUMN = "__bad"  # with JSON_COLUMN: why the row could not be read at all (None when it could)

MAX_JSON_DEPTH = 100  # levels of [ and { a row may nest, the row's own object included


# Suffixes that mark a file even when it does not exist (hub ids may contain dots: OpenHermes-2.5).
_FILE_SUFFIXES = {*BUILDERS, ".tsv", ".gz", ".bz2", ".xz", ".zst", ".zip", ".arrow", ".xlsx"}


def is_hub_id(path: str) -> bool:
    """`org/name` style: nothing on disk, no data-file suffix, no glob, not written as a path (./ / ~)."""
    p = Path(path)
    looks_local = (
        path.startswith((".", "/", "~")) or p.suffix.lower() in _FILE_SUFFIXES or any(c in path for c in "*?[")
    )
    return not (looks_local or p.exists())


def row_label(path: str, source=None) -> str:
    """How positions are named in messages about a file: lines for JSON lines and text lines, else rows."""
    if path.endswith(".txt"):
        return "line" if source is None or source.sample_by == "line" else source.sample_by
    return "line" if path.endswith(".jsonl") else "row"


def resolve_files(source, where: str) -> list[Path]:
    """The data files a source names, sorted; [] for a hub dataset id. Raises UserError if none."""
    path = os.path.expanduser(source.path)
    if is_hub_id(path):
        return []
    if any(c in path for c in "*?["):
        files = _real_files_once(_glob(path))
        kind = "pattern"
    elif Path(path).is_dir():
        # Hidden files and folders (.git, .ipynb_checkpoints) are never data. rglob does not descend
        # into linked folders (so no loop), but a linked file is a second name for a file.
        files = _real_files_once(
            p for p in Path(path).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        kind = "directory"
    else:
        files = [Path(path)]
        kind = None
    if kind is not None:
        # In a folder or pattern, .txt files are data only for text sources (not a README.txt).
        wanted = [s for s in BUILDERS if s != ".txt" or source.format == "text"]
        data_files = [p for p in files if p.suffix.lower() in wanted]
        if not data_files:
            txt = "" if ".txt" in wanted else (
                "; it holds .txt files, which only format: text reads" if any(p.suffix.lower() == ".txt" for p in files)
                else "; .txt files are data only for format: text")
            raise UserError.single(
                f"{where}.path", f"{kind} {path} holds no data files for format {source.format} "
                f"({', '.join(wanted)}{txt})")
        files = data_files
    for f in files:
        _check_file(f, source, where)
    if any(f.suffix.lower() == ".txt" for f in files) and source.format != "text":
        raise UserError.single(f"{where}.format", f"{path} is a .txt file, which is plain text: use format: text")
    return files


def _glob(pattern: str) -> list[Path]:
    """The files a glob pattern matches, like glob.glob(recursive=True) except that `**` does not
    follow links to folders.

    glob.glob does follow them: with data/latest -> v3, data/**/*.jsonl read every file twice, a
    link back up the tree (a loop) read them once more per level until the kernel's limit (about
    40 times), and /proc/self/**/*.json (where root links to /) walked the whole machine. pathlib's `**` never descends into a linked folder
    (as bash's globstar); a link named by the pattern itself (data/latest/*.jsonl) is still read.
    """
    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first]) if first else Path(".")
    # pathlib accepts ** only as a whole part; within a part glob.glob reads it as *.
    rest = [part if part == "**" else re.sub(r"\*\*+", "*", part) for part in parts[first:]]
    if rest[-1] == "**":  # pathlib's last ** matches folders only, glob.glob's everything below
        rest.append("*")
    # As glob.glob, wildcards do not match hidden names (.git, .cache) unless the pattern part
    # that matches them starts with a dot.
    dotted = [part for part in rest if part.startswith(".")]

    def visible(p: Path) -> bool:
        return all(
            not name.startswith(".") or any(fnmatch.fnmatchcase(name, d) for d in dotted)
            for name in p.relative_to(root).parts
        )

    return sorted((p for p in root.glob("/".join(rest)) if p.is_file() and visible(p)), key=str)


def _real_files_once(paths) -> list[Path]:
    """Sorted paths, each real file once (the first of its names): a file reached through a link
    and through its own folder would otherwise be trained twice, or leak from validation into training."""
    seen, files = set(), []
    for p in sorted(paths, key=str):
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            files.append(p)
    return files


def check_data_files(data) -> None:
    """Every source's files exist and have a data file type, and no file is named by two sources
    (it would be trained twice, or trained and validated on), whatever links lead to it. Hub
    sources are checked when loaded."""
    seen: dict = {}
    for group in ("sources", "val_sources"):
        for i, source in enumerate(getattr(data, group)):
            where = f"data.{group}[{i}]"
            for f in resolve_files(source, where):
                first, first_path = seen.setdefault(os.path.realpath(f), (where, f))
                if first == where:
                    continue
                same = "" if str(first_path) == str(f) else f" as {first_path}, the same file"
                if first.startswith("data.sources") and group == "val_sources":
                    advice = ("validating on training rows measures nothing: use another file, or "
                              "data.val_size to hold rows out of the training data")
                else:
                    advice = "name each file once (use weight or samples to repeat one)"
                raise UserError.single(f"{where}.path", f"{f} is also read by {first}{same}: {advice}")


def _check_file(path: Path, source, where: str) -> None:
    if not path.exists():
        raise UserError.single(f"{where}.path", f"data file not found: {path}")
    if path.is_dir():
        raise UserError.single(f"{where}.path", f"{path} is a directory")
    if path.suffix.lower() not in BUILDERS:
        raise UserError.single(
            f"{where}.path", f"unsupported file type {path.suffix!r} for {path}: use {', '.join(BUILDERS)}"
        )
    if not os.access(path, os.R_OK):
        raise UserError.single(f"{where}.path", f"{path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise UserError.single(f"{where}.path", f"{path} is empty")


def load_file(path: Path, source, where: str):
    """Read one data file into a Dataset with a ROW_COLUMN. Unreadable structure -> UserError."""
    import datasets

    builder = BUILDERS[path.suffix.lower()]
    # The JSON builder logs an ERROR before raising on a bad line; the fallback below handles that
    # file and reports each bad row itself, so the log would only be noise.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    kwargs = {}
    if builder == "csv":
        # Every column as text: a numeric answer ("42") is still an answer, and an empty cell is "".
        kwargs = {"features": _string_features(path), "keep_default_na": False}
    elif builder == "text":
        kwargs = {"sample_by": source.sample_by}
    deep: dict[int, int] = {}
    blank_line = True  # unless the scan of a JSON file finds none
    if builder == "json":
        scan = _scan_json(path)
        blank_line = scan.blank_line
        release_freed_memory()  # the scan's blocks, which glibc would otherwise keep under every later peak
        deep = scan.deep
        if deep and not scan.lines:
            # One array: the file cannot be read around the row, so it is refused (as when the
            # array is malformed), at the line where the nesting passes the limit.
            raise UserError.single(
                f"{where}.path",
                f"{path} line {min(deep)}: a value is nested more than {MAX_JSON_DEPTH} levels deep (real rows "
                "nest a few), so the file is not read: fix or remove that row",
            )
        if deep or not scan.utf8 or scan.lone_surrogate:
            # Line by line instead, so each bad line is a located bad row: a line nested too deeply
            # is never parsed; pyarrow's reader lets invalid UTF-8 through (and fails later, on
            # access); and `datasets` reads a JSON array with ujson, which silently deletes a lone
            # surrogate (an unpaired \ud800-\udfff escape) from the text to train on.
            return _load_json_rows(path, where, deep)
    try:
        # force_redownload: `datasets` keys its own copy of a local file on path and mtime, so an edit
        # that keeps the mtime (cp -p, rsync -a, unzip) would be served stale. Our cache (cache.py)
        # keys on content and already skips this whole step when nothing changed.
        ds = datasets.load_dataset(
            builder, data_files=str(path), split="train", download_mode="force_redownload", **kwargs
        )
    except Exception as exc:  # datasets raises many types for unreadable files
        if builder != "json":
            raise UserError.single(f"{where}.path", f"could not read {path}: {_reason(exc)}") from None
        return _load_json_rows(path, where, deep)
    # The JSON reader's buffers are freed but stay with pyarrow's allocator (mimalloc) until asked:
    # hand them back, so that they do not sit under every later step's peak (30 MB at 20,000 rows).
    release_freed_memory()
    if len(ds) == 0:
        raise UserError.single(f"{where}.path", f"{path} has no rows")
    return ds.add_column(ROW_COLUMN, _row_numbers(path, len(ds), blank_line))


def load_hub(source, where: str):
    """Read a hub dataset split (datasets caches it locally). Without the hub (switched off, or not
    reachable) only datasets' cache is read: one message at once instead of datasets' retries."""
    import datasets

    from qlora_cli.util.hub import hub_host, hub_offline, hub_reachable

    without_hub = None
    if hub_offline():
        without_hub = "the hub is switched off (HF_HUB_OFFLINE)"
    elif not hub_reachable():
        without_hub = f"the hub ({hub_host()}) is unreachable"
    offline_before = datasets.config.HF_HUB_OFFLINE
    try:
        if without_hub:
            datasets.config.HF_HUB_OFFLINE = True  # the cache only: no retries against a hub that is not there
        ds = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except Exception as exc:
        if without_hub:
            raise UserError.single(
                f"{where}.path", f"hub dataset {source.path!r} is not in the local cache and {without_hub}: "
                "point the source at a local file (datasets' save_to_disk or a JSON lines export), or run where "
                "the hub is reachable once to cache it; if it is meant to be a local file, check the path",
            ) from None
        raise UserError.single(
            f"{where}.path",
            f"could not load hub dataset {source.path!r}: {_reason(exc)}. If it is meant to be a local file, "
            "check the path",
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline_before
    if len(ds) == 0:
        raise UserError.single(f"{where}.path", f"{source.path} ({source.split}) has no rows")
    import numpy as np

    return ds.add_column(ROW_COLUMN, np.arange(1, len(ds) + 1, dtype=np.int64))


# --- Bounding the nesting depth ----------------------------------------------------------------

# The bytes the depth scan looks at; every other byte is deleted before numpy sees the text.
_STRUCTURE = b'[]{}"\n'
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in _STRUCTURE)
_NOT_OPENING = bytes(b for b in range(256) if b not in b"[{\n")
_ESCAPED = re.compile(rb'\\[\\"]')  # \\ or \"
_BLOCK = 16 << 20  # JSON lines are scanned this many bytes at a time


def deep_json_lines(data: bytes, one_value: bool = False, limit: int = MAX_JSON_DEPTH) -> dict[int, int]:
    """{line: deepest level} for each line (1-based) of JSON text where values nest more than `limit` deep.

    `data` is JSON lines (each line a value, starting again at depth 0) unless `one_value` (one value
    over many lines, such as a JSON array of rows: the depth carries from line to line). Brackets
    inside strings are text and do not count. Broken JSON gets an answer too, never an error: the
    parser reports it afterwards. Fast enough to run on every data file: a few bytewise passes in
    C (count, replace, translate), then numpy on the brackets and quotes alone.
    """
    if data.count(b"[") + data.count(b"{") <= limit:  # most rows, and small files: nothing to scan
        return {}
    if not one_value:
        # A line opens at most as many levels as it holds [ and { (strings included). In nearly
        # every file no line holds `limit` of them, and that is the whole check: one pass in C.
        if max(map(len, data.translate(None, _NOT_OPENING).split(b"\n"))) <= limit:
            return {}
    import numpy as np

    if b'\\"' in data:
        # An escaped quote does not end a string: blank it out. Escaped backslashes too, read left to
        # right as a parser does, so that the quote of `\\"` (a string ending in a backslash) still
        # ends it. Same length: same lines.
        data = _ESCAPED.sub(b"  ", data)
    chars = np.frombuffer(data.translate(None, _NOT_STRUCTURE), np.uint8)
    newline = chars == ord("\n")
    # Inside a string after an odd number of quotes. Valid JSON has no raw newline inside a string,
    # so each line starts outside one (and an unterminated string cannot hide the lines after it).
    quotes = np.cumsum(chars == ord('"'), dtype=np.int64)
    outside = (quotes - np.maximum.accumulate(np.where(newline, quotes, 0))) % 2 == 0
    opens = outside & ((chars == ord("[")) | (chars == ord("{")))
    closes = outside & ((chars == ord("]")) | (chars == ord("}")))
    depth = np.cumsum(opens.astype(np.int64) - closes)
    if not one_value:  # depth since the line began (a broken line does not carry into the next)
        last_newline = np.maximum.accumulate(np.where(newline, np.arange(len(chars)), -1))
        depth -= np.where(last_newline >= 0, depth[np.maximum(last_newline, 0)], 0)
    deep = np.flatnonzero(opens & (depth > limit))  # the brackets that open a level past the limit
    if not len(deep):
        return {}
    lines = np.cumsum(newline)[deep] + 1
    first = np.flatnonzero(np.diff(lines, prepend=0))  # where each line's run of positions begins
    return dict(zip(lines[first].tolist(), np.maximum.reduceat(depth[deep], first).tolist()))


@dataclass
class _JsonScan:
    """What one pass over a JSON file's bytes found, before any parser reads it."""

    lines: bool  # JSON lines (else one array of rows)
    deep: dict[int, int] = field(default_factory=dict)  # lines nested more than MAX_JSON_DEPTH deep
    utf8: bool = True
    lone_surrogate: bool = False  # an escape of half a UTF-16 surrogate pair (\ud800) without the other
    blank_line: bool = False  # JSON lines with a line of whitespace alone, which readers skip (not a row)


def _scan_json(path: Path) -> _JsonScan:
    """One read of the file, a block of whole lines at a time (a JSON array at once: every parser
    reads it whole anyway, and its depth carries from line to line)."""
    scan = _JsonScan(lines=_is_json_lines(path))
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 0  # lines before the block
    for block in _line_blocks(path) if scan.lines else [path.read_bytes()]:
        if scan.lines:
            scan.deep.update((line + n, d) for n, d in deep_json_lines(block).items())
            scan.blank_line = scan.blank_line or _has_blank_line(block)
        else:  # the array holding the rows is a level itself
            scan.deep = deep_json_lines(block, one_value=True, limit=MAX_JSON_DEPTH + 1)
        line += block.count(b"\n")
        scan.lone_surrogate = scan.lone_surrogate or _has_lone_surrogate(block)
        try:
            # A megabyte at a time: decoding the block to one string costs several times more.
            for start in range(0, len(block), 1 << 20) if scan.utf8 else ():
                decoder.decode(memoryview(block)[start : start + (1 << 20)])
        except UnicodeDecodeError:
            scan.utf8 = False
    try:
        decoder.decode(b"", final=True)  # a character cut off by the end of the file
    except UnicodeDecodeError:
        scan.utf8 = False
    return scan


def _line_blocks(path: Path):
    """The file's bytes in blocks of about _BLOCK bytes that end at a line end (or the file's)."""
    rest = b""
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            text = rest + block
            end = text.rfind(b"\n") + 1
            if end:
                yield text[:end]
            rest = text[end:]
    if rest:
        yield rest


# A line of whitespace alone (bytes.strip()'s whitespace) after a line end.
_BLANK_AFTER_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")


def _has_blank_line(block: bytes) -> bool:
    """Does a block of whole lines (as _line_blocks yields them) hold a line of whitespace alone?
    One search in C: a per-line loop in Python took longer than the JSON reader's whole parse."""
    first_end = block.find(b"\n") + 1 or len(block)
    last = block[block.rfind(b"\n") + 1 :]  # empty when the block ends with a line end
    return (not block[:first_end].strip() or bool(last) and not last.strip()
            or _BLANK_AFTER_LINE.search(block) is not None)


# Any \ud800-\udfff escape; a proper pair is a high one (d800-dbff) then a low one (dc00-dfff).
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(data: bytes) -> bool:
    """Does the JSON text escape half of a UTF-16 surrogate pair without the other half?"""
    if not _SURROGATE.search(data):  # almost every file: one fast search
        return False
    data = data.replace(b"\\\\", b"  ")  # in `\\ud800` the backslash is escaped: text, not an escape
    return len(_SURROGATE.findall(data)) != 2 * len(_SURROGATE_PAIR.findall(data))


def _is_json_lines(path: Path) -> bool:
    """JSON lines (a value per line), or one JSON array? By the first character, whatever the suffix."""
    if path.suffix.lower() == ".jsonl":
        return True
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


def _string_features(path: Path):
    import csv

    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's byte-order mark
        header = next(csv.reader(f), [])
    # pandas names an empty header cell (e.g. to_csv's index column) "Unnamed: i"
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    return Features({name: Value("string") for name in names}) if names else None


def _row_numbers(path: Path, n: int, blank_line: bool = True):
    """Each row's 1-based number, as a numpy array (8 bytes a row, no Python object per row).
    BLANK_LINE: whether the file may hold a blank line (_JsonScan.blank_line says)."""
    import numpy as np

    # In a .jsonl file, blank lines are skipped by the reader, so row i is not always line i.
    if path.suffix != ".jsonl" or not blank_line:
        return np.arange(1, n + 1, dtype=np.int64)
    with path.open("rb") as f:
        lines = np.fromiter((i for i, line in enumerate(f, start=1) if line.strip()), dtype=np.int64)
    return lines if len(lines) == n else np.arange(1, n + 1, dtype=np.int64)


def _load_json_rows(path: Path, where: str, deep: dict[int, int]):
    """The slow, forgiving reader: each row kept as JSON text, judged later (with its line number).
    A line that cannot be read at all (in `deep`, or not UTF-8) is kept as the reason instead."""
    import datasets

    texts, rows, bad = [], [], []
    if _is_json_lines(path):
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    text, reason = None, None
                    if number in deep:  # never parsed: json would raise RecursionError, pyarrow crash
                        reason = f"nested more than {MAX_JSON_DEPTH} levels deep (real rows nest a few); not read"
                    else:
                        try:
                            text = raw.decode("utf-8").rstrip("\r\n")
                        except UnicodeDecodeError:
                            reason = "the line is not valid UTF-8"
                    texts.append(text)
                    bad.append(reason)
                    rows.append(number)
    else:
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", None)
            at = f" at line {line}" if line else ""
            raise UserError.single(
                f"{where}.path", f"{path} is not valid JSON{at}: {_reason(exc)}. A .json file must be one array"
            ) from None
        if not isinstance(records, list):
            raise UserError.single(f"{where}.path", f"{path} must hold a JSON array of rows (or JSON lines)")
        # ensure_ascii: a lone surrogate stays an escape (Arrow cannot store it as text); the row is
        # parsed again, and judged, in the pipeline.
        texts = [json.dumps(r) for r in records]
        rows = list(range(1, len(records) + 1))
        bad = [None] * len(records)
    if not texts:
        raise UserError.single(f"{where}.path", f"{path} has no rows")
    return datasets.Dataset.from_dict({JSON_COLUMN: texts, BAD_COLUMN: bad, ROW_COLUMN: rows})


def _reason(exc: Exception) -> str:
    # `datasets` wraps the parser's error ("Expected 2 fields in line 3") in a generic one
    while exc.__cause__ is not None and "error occurred while generating" in str(exc):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
