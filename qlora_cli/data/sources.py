"""Where rows come from: a recipe source -> the files it names -> raw rows, with their line numbers.

    files = resolve_files(source, "data.sources[0]")    # [Path, ...], or [] for a hub dataset id
    raw = load_file(path, source, "data.sources[0]")     # a datasets.Dataset of raw rows, plus ROW_COLUMN

A source is a file, a glob, a directory (every data file inside, recursively, in sorted order) or
a hub dataset id. Each file is read by `datasets` (Arrow, fast). Two things it cannot do are done
here: report *where* a bad row is, and keep going past one. So when `datasets` refuses a JSON file
(a malformed line, a value of the wrong type), the file is read again, JSON lines line by line, a
JSON array row by row, and every row is kept as its JSON text, to be parsed and judged one by one by
the pipeline (on_bad_row).
"""

from __future__ import annotations

import codecs
import glob
import json
import logging
import os
from pathlib import Path

from qlora_cli.errors import UserError

# File suffix -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

ROW_COLUMN = "__row"  # 1-based row (or, for .jsonl, line) number within its file
JSON_COLUMN = "__json"  # the row's JSON text, when the file had to be read line by line


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
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if Path(p).is_file()]
        kind = "pattern"
    elif Path(path).is_dir():
        # Hidden files and folders (.git, .ipynb_checkpoints) are never data.
        files = sorted(
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
            raise UserError.single(f"{where}.path", f"{kind} {path} holds no data files ({', '.join(wanted)})")
        files = data_files
    for f in files:
        _check_file(f, source, where)
    if any(f.suffix.lower() == ".txt" for f in files) and source.format != "text":
        raise UserError.single(f"{where}.format", f"{path} is a .txt file, which is plain text: use format: text")
    return files


def check_data_files(data) -> None:
    """Every source's files exist and have a data file type, and no file is named by two sources
    (it would be trained twice, or trained and validated on). Hub sources are checked when loaded."""
    seen: dict = {}
    for group in ("sources", "val_sources"):
        for i, source in enumerate(getattr(data, group)):
            where = f"data.{group}[{i}]"
            for f in resolve_files(source, where):
                first = seen.setdefault(f.resolve(), where)
                if first != where:
                    raise UserError.single(
                        f"{where}.path",
                        f"{f} is also read by {first}: name each file once (use weight or samples to repeat one)",
                    )


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
    if builder == "json" and not _is_utf8(path):
        # pyarrow's JSON reader lets invalid UTF-8 through (and fails later, on access): read it
        # line by line instead, so each bad line is a located bad row.
        return _load_json_rows(path, where)
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
        return _load_json_rows(path, where)
    if len(ds) == 0:
        raise UserError.single(f"{where}.path", f"{path} has no rows")
    return ds.add_column(ROW_COLUMN, _row_numbers(path, len(ds)))


def load_hub(source, where: str):
    """Read a hub dataset split (datasets caches it locally)."""
    import datasets

    try:
        ds = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except Exception as exc:
        raise UserError.single(
            f"{where}.path",
            f"could not load hub dataset {source.path!r}: {_reason(exc)}. If it is meant to be a local file, "
            "check the path",
        ) from None
    if len(ds) == 0:
        raise UserError.single(f"{where}.path", f"{source.path} ({source.split}) has no rows")
    return ds.add_column(ROW_COLUMN, list(range(1, len(ds) + 1)))


def _is_utf8(path: Path) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _string_features(path: Path):
    import csv

    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: Excel's byte-order mark
        header = next(csv.reader(f), [])
    # pandas names an empty header cell (e.g. to_csv's index column) "Unnamed: i"
    names = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
    return Features({name: Value("string") for name in names}) if names else None


def _row_numbers(path: Path, n: int) -> list[int]:
    # In a .jsonl file, blank lines are skipped by the reader, so row i is not always line i.
    if path.suffix != ".jsonl":
        return list(range(1, n + 1))
    with path.open("rb") as f:
        lines = [i for i, line in enumerate(f, start=1) if line.strip()]
    return lines if len(lines) == n else list(range(1, n + 1))


def _load_json_rows(path: Path, where: str):
    """The slow, forgiving reader: each row kept as JSON text, judged later (with its line number)."""
    import datasets

    texts, rows = [], []
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if path.suffix.lower() == ".jsonl" or not head.startswith(b"["):  # JSON Lines, whatever the suffix
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    try:
                        texts.append(raw.decode("utf-8").rstrip("\r\n"))
                    except UnicodeDecodeError:
                        texts.append(None)  # judged as a bad row, with its line number
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
        texts = [json.dumps(r, ensure_ascii=False) for r in records]
        rows = list(range(1, len(records) + 1))
    if not texts:
        raise UserError.single(f"{where}.path", f"{path} has no rows")
    return datasets.Dataset.from_dict({JSON_COLUMN: texts, ROW_COLUMN: rows})


def _reason(exc: Exception) -> str:
    # `datasets` wraps the parser's error ("Expected 2 fields in line 3") in a generic one
    while exc.__cause__ is not None and "error occurred while generating" in str(exc):
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
