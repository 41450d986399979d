"""From the recipe's data section to tokenized train/validation datasets with loss masks.

    train_ds, eval_ds, stats = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)

Each output row has `input_ids` and `labels`, with -100 on every token that carries no loss.
TRL's SFTTrainer accepts such a pre-tokenized dataset as is: it truncates to max_length, drops
rows left with no trained token, and pads (labels with -100), so the masks computed here are
exactly the ones trained on. The rows it would drop are dropped (and counted) here first.

Steps, per source: load (datasets) -> rename mapped columns -> canonical form (formats.py) ->
render with the template and tokenize (templates.py, via the tokenizer's chat template) -> mask.
Then concatenate the sources and split off the validation rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qlora_cli.data.formats import FIELDS, OPTIONAL_FIELDS, BadRow, to_canonical
from qlora_cli.errors import Problem, UserError

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
MAX_REPORTED_BAD_ROWS = 5


@dataclass
class DataStats:
    """What the pipeline saw; goes into summary.json."""

    rows: dict[str, int] = field(default_factory=dict)  # per source path
    train_rows: int = 0
    val_rows: int = 0
    train_tokens: int = 0  # tokens per epoch, before truncation
    trained_tokens: int = 0  # tokens with a loss, per epoch, before truncation
    over_max_len: int = 0  # train examples that will be truncated to max_seq_len
    dropped_no_response: int = 0  # rows left out: their response starts beyond max_seq_len


def is_local(path: str) -> bool:
    """A source is a local file when it has a known file suffix or exists; otherwise a hub id."""
    return Path(path).suffix in LOCAL_FORMATS or Path(path).exists()


def tokenize_example(example: dict, tokenizer, train_on_inputs: bool) -> dict:
    """Tokenize one canonical example; labels are -100 outside assistant turns (unless train_on_inputs).

    Conversations go through the tokenizer's chat template (the run's template), with the
    assistant mask that transformers derives from `{% generation %}` blocks, computed on the
    full tokenized sequence: the same tokens that are trained. Plain text is trained in full.
    """
    if example.get("text") is not None:
        ids = tokenizer(example["text"], add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = bos + ids + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    out = tokenizer.apply_chat_template(
        example["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=not train_on_inputs
    )
    ids = list(out["input_ids"])
    if train_on_inputs:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
    return {"input_ids": ids, "labels": labels}


def build_datasets(data, tokenizer, seed: int):
    """Load, convert, tokenize and split every source. Raises UserError naming file and row on bad input."""
    from datasets import concatenate_datasets

    parts, stats = [], DataStats()
    for i, source in enumerate(data.sources):
        raw = _load_source(source, f"data.sources[{i}]")
        rows = _process(raw, source, f"data.sources[{i}]", tokenizer, data.train_on_inputs)
        stats.rows[source.path] = len(rows)
        parts.append(rows)
    full = concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    # Rows whose response starts beyond max_seq_len keep no trained token after truncation. TRL
    # would drop them silently (from train and validation alike); drop them here, where they
    # can be counted and reported, and refuse a run that would have nothing left.
    limit = data.max_seq_len
    keep = [i for i, labels in enumerate(full["labels"]) if any(t != IGNORE_INDEX for t in labels[:limit])]
    stats.dropped_no_response = len(full) - len(keep)
    if not keep:
        raise UserError.single(
            "data.max_seq_len",
            f"every example's response starts after token {limit}, so nothing would be trained: raise it",
        )
    if stats.dropped_no_response:
        full = full.select(keep)

    eval_ds = None
    if data.val_size > 0:
        n_val = int(data.val_size) if data.val_size >= 1 else max(1, round(len(full) * data.val_size))
        if n_val >= len(full):
            raise UserError.single(
                "data.val_size", f"asks for {n_val} validation rows but the data has only {len(full)}: lower it"
            )
        split = full.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        full, eval_ds = split["train"], split["test"]

    lengths = [len(ids) for ids in full["input_ids"]]
    stats.train_rows = len(full)
    stats.val_rows = len(eval_ds) if eval_ds is not None else 0
    stats.train_tokens = sum(lengths)
    stats.trained_tokens = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in full["labels"])
    stats.over_max_len = sum(1 for n in lengths if n > limit)
    return full, eval_ds, stats


def _load_source(source, where: str):
    """Read one source with `datasets`; every failure becomes a message naming the file."""
    import datasets

    try:
        if is_local(source.path):
            path = Path(source.path)
            if path.is_dir():
                raise UserError.single(f"{where}.path", f"{path} is a directory: name a data file inside it")
            if not path.is_file():
                raise UserError.single(f"{where}.path", f"data file not found: {path}")
            if path.stat().st_size == 0:
                raise UserError.single(f"{where}.path", f"{path} is empty")
            builder = LOCAL_FORMATS.get(path.suffix)
            if builder is None:
                raise UserError.single(
                    f"{where}.path", f"unsupported file type {path.suffix!r}: use {', '.join(LOCAL_FORMATS)}"
                )
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source.path, source.subset, split=source.split, revision=source.revision)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable files; all are user input problems
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UserError.single(f"{where}.path", f"could not read {source.path}: {reason}") from None
    if len(ds) == 0:
        raise UserError.single(f"{where}.path", f"{source.path} has no rows")
    return ds


def _process(raw, source, where: str, tokenizer, train_on_inputs: bool):
    """Column mapping, canonical form, tokenization; collects bad rows instead of failing on the first."""
    fields = FIELDS[source.format]
    unknown = sorted(set(source.columns) - set(fields))
    if unknown:
        raise UserError.single(
            f"{where}.columns", f"{', '.join(unknown)} is not a field of the {source.format} format ({', '.join(fields)})"
        )
    rename = {source.columns.get(f, f): f for f in fields}
    missing = [col for col, f in rename.items() if col not in raw.column_names and f not in OPTIONAL_FIELDS]
    if missing:
        raise UserError.single(
            f"{where}.columns",
            f"{source.path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(raw.column_names)}). "
            f"Map your column names, e.g. columns: {{{fields[0]}: your_column}}",
        )
    present = {col: f for col, f in rename.items() if col in raw.column_names}

    def convert(row: dict) -> dict:
        try:
            example = to_canonical({f: row[col] for col, f in present.items()}, source.format)
            return {**tokenize_example(example, tokenizer, train_on_inputs), "error": ""}
        except BadRow as exc:
            return {"input_ids": [], "labels": [], "error": str(exc)}

    rows = raw.map(convert, remove_columns=raw.column_names, desc=f"Tokenizing {source.path}")
    errors = [(i, e) for i, e in enumerate(rows["error"]) if e]
    if errors:
        problems = [Problem(f"{source.path}: row {i + 1}", reason) for i, reason in errors[:MAX_REPORTED_BAD_ROWS]]
        more = len(errors) - len(problems)
        header = f"{len(errors)} bad row(s) in {source.path} ({where}); fix or remove them" + (
            f" ({more} more not shown):" if more else ":"
        )
        raise UserError(problems, header=header)
    return rows.remove_columns("error")
