"""Where rows come from: a recipe source -> the files it names -> raw rows, with their line numbers.

    files = resolve_files(source, "data.sources[0]")    # [Path, ...], or [] for a hub dataset id
    raw = load_file(path, source, "data.sources[0]")     # a datasets.Dataset of raw rows, plus ROW_COLUMN

A source is a file, a glob, a directory (every data file inside, recursively, in sorted order) or
a hub dataset id. Each file is read by `datasets` (Arrow, fast). Two things it cannot do are done
here: report *where* a bad row is, and keep going past one. So when `datasets` refuses a JSON file
(a malformed line, a value of the wrong type), the file is read again line by line, and every row
is kept as its JSON text, to be parsed and judged one by one by the pipeline (on_bad_row).
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

from qlora_cli.errors import UserError

# File suffix -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

ROW_COLUMN = "__row"  # 1-based row (or, for .jsonl, line) number within its file
JSON_COLUMN = "__json"  # the row's JSON text, when the file had to be read line by line


def is_hub_id(path: str) -> bool:
    """A path that names nothing on disk, has no data-file suffix and no glob characters: a hub dataset."""
    return not (Path(path).exists() or Path(path).suffix in BUILDERS or any(c in path for c in "*?["))


def row_label(path: str) -> str:
    """How positions are named in messages about this file: JSON lines are lines, the rest rows."""
    return "line" if path.endswith(".jsonl") or path.endswith(".txt") else "row"


def resolve_files(source, where: str) -> list[Path]:
    """The data files a source names, sorted; [] for a hub dataset id. Raises UserError if none."""
    path = source.path
    if is_hub_id(path):
        return []
    if any(c in path for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(path, recursive=True)) if Path(p).is_file()]
        kind = "pattern"
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.name.startswith("."))
        kind = "directory"
    else:
        files = [Path(path)]
        kind = None
    if kind is not None:
        data_files = [p for p in files if p.suffix in BUILDERS]
        if not data_files:
            raise UserError.single(
                f"{where}.path", f"{kind} {path} holds no data files ({', '.join(BUILDERS)})"
            )
        files = data_files
    for f in files:
        _check_file(f, source, where)
    suffixes = {f.suffix for f in files}
    if ".txt" in suffixes and source.format != "text":
        raise UserError.single(f"{where}.format", f"{path} holds .txt files, which are plain text: use format: text")
    return files


def _check_file(path: Path, source, where: str) -> None:
    if not path.exists():
        raise UserError.single(f"{where}.path", f"data file not found: {path}")
    if path.is_dir():
        raise UserError.single(f"{where}.path", f"{path} is a directory")
    if path.suffix not in BUILDERS:
        raise UserError.single(
            f"{where}.path", f"unsupported file type {path.suffix!r} for {path}: use {', '.join(BUILDERS)}"
        )
    if path.stat().st_size == 0:
        raise UserError.single(f"{where}.path", f"{path} is empty")


def load_file(path: Path, source, where: str):
    """Read one data file into a Dataset with a ROW_COLUMN. Unreadable structure -> UserError."""
    import datasets

    builder = BUILDERS[path.suffix]
    # The JSON builder logs an ERROR before raising on a bad line; the fallback below handles that
    # file and reports each bad row itself, so the log would only be noise.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    kwargs = {}
    if builder == "csv":
        # Every column as text: a numeric answer ("42") is still an answer, and an empty cell is "".
        kwargs = {"features": _string_features(path), "keep_default_na": False}
    elif builder == "text":
        kwargs = {"sample_by": source.sample_by}
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
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


def _string_features(path: Path):
    import csv

    from datasets import Features, Value

    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return Features({name: Value("string") for name in header}) if header else None


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
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    texts.append(line.rstrip("\r\n"))
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
        if isinstance(records, dict):
            # `datasets` reads {"data": [...]}-style files through a field; keep it simple: one array
            raise UserError.single(f"{where}.path", f"{path} holds a JSON object: it must be an array of rows")
        if not isinstance(records, list):
            raise UserError.single(f"{where}.path", f"{path} must hold a JSON array of rows")
        texts = [json.dumps(r, ensure_ascii=False) for r in records]
        rows = list(range(1, len(records) + 1))
    if not texts:
        raise UserError.single(f"{where}.path", f"{path} has no rows")
    return datasets.Dataset.from_dict({JSON_COLUMN: texts, ROW_COLUMN: rows})


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
