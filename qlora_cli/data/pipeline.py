"""From the recipe's data section to tokenized train/validation datasets with loss masks.

    prepared = build_datasets(recipe.data, tokenizer, template, seed=recipe.train.seed)
    prepared.train, prepared.val, prepared.stats

Each output row has `input_ids` and `labels` (-100 on every token that carries no loss), plus
`source`, `file`, `row`, `length` and `trained` so that `qlora data` can say where an example came
from. TRL's SFTTrainer takes such a pre-tokenized dataset as is, so the masks computed here are
exactly the ones trained on.

Per source: files (sources.py) -> raw rows -> canonical form (formats.py) -> rendered text and loss
spans (templates.py) -> input_ids and labels (tokenize.py) -> the length policy. That runs as one
batched `datasets.map`, in several processes for large files. Then:
  - the validation rows are set aside (a fraction or count of the pool, or val_sources), before
    any source is repeated, so no training row can also be a validation row;
  - each training source is sampled to its weight or count, and everything is shuffled with the seed;
  - statistics are computed, and the result is cached (cache.py) for the next run.

Rows that do not fit their format follow data.on_bad_row; problems that are not about one row (an
unmapped tool-call role, a template that would drop a message) always stop the run.
"""

from __future__ import annotations

import gc
import json
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from qlora_cli.data import cache as data_cache
from qlora_cli.data.formats import (
    FIELDS,
    OPTIONAL_FIELDS,
    BadRow,
    UnmappedRole,
    to_canonical,
)
from qlora_cli.data.inherit import inherited
from qlora_cli.data.sources import (
    BAD_COLUMN,
    JSON_COLUMN,
    ROW_COLUMN,
    check_data_files,
    load_file,
    load_hub,
    resolve_files,
    row_label,
)
from qlora_cli.data.templates import Renderer, TemplateMismatch, system_notice
from qlora_cli.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    encode,
    encode_text,
    lone_surrogate,
)
from qlora_cli.errors import Problem, UserError
from qlora_cli.util.libraries import dataset_row_order
from qlora_cli.util.memory import release_freed_memory

MAX_REPORTED = 5  # bad rows shown in a message
ROWS_PER_PROCESS = 2000  # below this, worker processes cost more than they save
# Rows per call of the map function, and so per record batch of its output file. Each record batch's
# header and small columns (row, length, status) are read back by this process through the memory
# map, and the kernel maps 64 KB around every page it faults in: at 500 rows a batch that was 0.15 KB
# of resident file pages a row (150 MB at a million rows); at 2,000, a quarter of it. A batch's
# encodings (80 bytes a token) are what a worker holds meanwhile: 35-90 MB.
MAP_BATCH = 2000

# Each row's place in its group's tokenized files, all rows counted (kept or not): what the cache
# stores the train and validation order as. Removed before the datasets are returned.
POSITION = "__position"
DROPPED_COLUMNS = ["status", "reason", "examples"]

# Row status after tokenization. Only "ok" rows are kept.
OK, BAD, TOO_LONG, NO_RESPONSE, UNMAPPED_ROLE, TEMPLATE = "ok", "bad", "too_long", "no_response", "role", "template"


@dataclass
class SourceStats:
    """What happened to one source's rows."""

    path: str
    files: list[str] = field(default_factory=list)
    rows: int = 0  # rows read
    bad_rows: int = 0  # skipped by on_bad_row: skip
    bad_row_examples: list[str] = field(default_factory=list)  # the first few, located
    truncated: int = 0  # longer than max_seq_len, cut to it
    split_documents: int = 0  # longer than max_seq_len, trained as several blocks (on_too_long: split)
    dropped_too_long: int = 0  # longer than max_seq_len, dropped (on_too_long: drop)
    dropped_no_response: int = 0  # no response token within max_seq_len
    split_rows: int = 0  # conversations trained as one example per rewritten turn (Renderer.examples)
    kept: int = 0  # examples that survived the above
    used: int = 0  # rows in the train (or validation) set after weight/samples; may repeat rows
    held_out: int = 0  # rows set aside for validation (val_size)


@dataclass
class DataStats:
    """What the pipeline saw and built; shown by `qlora data` and stored in summary.json."""

    sources: list[SourceStats] = field(default_factory=list)
    val_sources: list[SourceStats] = field(default_factory=list)
    train_rows: int = 0
    val_rows: int = 0
    train_tokens: int = 0  # tokens per epoch (after truncation)
    trained_tokens: int = 0  # tokens with a loss, per epoch
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)  # "file line N: reason", the first few
    truncated: int = 0
    split_documents: int = 0
    blocks: int = 0  # examples after splitting (on_too_long: split): what packing then bins
    dropped_too_long: int = 0
    dropped_no_response: int = 0
    split_rows: int = 0
    notes: list[str] = field(default_factory=list)  # how the template treats this data, said once
    lengths: dict = field(default_factory=dict)  # percentiles of train example lengths
    histogram: list = field(default_factory=list)  # [[upper bound, count], ...]
    batching: dict = field(default_factory=dict)  # padding/packing efficiency, steps per epoch
    cache: str = "off"  # hit, miss or off
    cache_key: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        d = dict(d)
        d["sources"] = [SourceStats(**s) for s in d["sources"]]
        d["val_sources"] = [SourceStats(**s) for s in d["val_sources"]]
        return cls(**d)


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    val: object | None
    stats: DataStats

    def for_trainer(self):
        """(train, val) with only the columns SFTTrainer reads."""
        keep = ["input_ids", "labels"]
        return self.train.select_columns(keep), self.val.select_columns(keep) if self.val is not None else None


def build_datasets(data, tokenizer, template, seed: int, batch_size: int = 8, use_cache: bool | None = None,
                   packing_figures: bool | None = None):
    """Load, convert, tokenize, mix and split every source. Raises UserError naming file and row on bad input.

    `batch_size` (examples per step) is only used for the padding-efficiency statistics. `packing_figures`:
    also work out what packing would give (TRL's packing of every length: 0.3 s at 20,000 rows, 19 s at a
    million), for `qlora data`'s comparison; by default only where the run packs (data.packing).
    """
    if any(s.format in ("preference", "unpaired") for s in [*data.sources, *data.val_sources]):
        from qlora_cli.data.preference import as_sft_prepared  # a DPO/ORPO/KTO run's rows, chosen replies scored

        return as_sft_prepared(data, tokenizer, template, seed, batch_size)
    use_cache = data.cache if use_cache is None else use_cache
    packing_figures = data.packing if packing_figures is None else packing_figures
    renderer = Renderer(template, tokenizer) if template is not None else None
    key = None
    if use_cache:
        key = data_cache.key(data, seed, tokenizer, template)
        hit = data_cache.load(key)
        if hit is not None:
            train, val = _assemble(*hit[:2])
            stats = DataStats.from_dict(hit[2])
            stats.cache, stats.cache_key = "hit", key
            # Neither the batch size nor packing is in the key: figures for others are worked out again.
            if stats.batching.get("batch_size") != batch_size or (packing_figures and "packed_rows" not in stats.batching):
                stats.batching = batching_efficiency(
                    trained_lengths(train, data), data.max_seq_len, batch_size, seed, packing=packing_figures
                )
            return PreparedData(train, val, stats)

    check_data_files(data)
    stats = DataStats()
    parts = {}  # group -> [(tokenized file, source index, file index)]: what the cache stores
    pool, stats.sources, parts["sources"] = _process_group(data, "sources", renderer, tokenizer)
    val = None
    if data.val_sources:
        val, stats.val_sources, parts["val_sources"] = _process_group(data, "val_sources", renderer, tokenizer)
        val = _mix(val, data.val_sources, stats.val_sources, seed)
    elif data.val_size > 0:
        n_val = int(data.val_size) if data.val_size >= 1 else max(1, round(len(pool) * data.val_size))
        if n_val >= len(pool):
            raise UserError.single(
                "data.val_size", f"asks for {n_val} validation rows but the data has only {len(pool)}: lower it"
            )
        split = pool.train_test_split(test_size=n_val, seed=seed, shuffle=True)
        pool, val = split["train"], split["test"]
    train = _mix(pool, data.sources, stats.sources, seed)

    _fill_totals(stats, train, val, data, batch_size, seed, packing_figures)
    notice = system_notice(template) if template is not None else None
    stats.notes = [notice] if notice else []
    if use_cache:
        # The tokenized files as the map wrote them, and the train and validation rows as positions
        # in them: no row is read to store them (writing the shuffled rows read every token id
        # through the memory map, which held them all in RSS: 1 GB per 200,000 Alpaca rows).
        orders = {"train": ("sources", _column(train, POSITION))}
        if val is not None:
            orders["val"] = ("val_sources" if data.val_sources else "sources", _column(val, POSITION))
        data_cache.store(key, parts, orders, stats.to_dict())
        stats.cache, stats.cache_key = "miss", key
    train = train.remove_columns([POSITION])
    val = val.remove_columns([POSITION]) if val is not None else None
    return PreparedData(train, val, stats)


def _assemble(parts: dict, orders: dict):
    """(train, val) from the cache: each group's tokenized files tagged and concatenated as when they
    were built, then the stored orders selected from them."""
    from datasets import concatenate_datasets

    pools = {}
    for group, files in parts.items():
        tagged, offset = [], 0
        for ds, source, file in files:
            tagged.append(_tag(ds, source, file, offset).remove_columns(DROPPED_COLUMNS))
            offset += len(ds)
        pools[group] = concatenate_datasets(tagged) if len(tagged) > 1 else tagged[0]
    out = []
    for name in ("train", "val"):
        if name not in orders:
            out.append(None)
            continue
        group, order = orders[name]
        out.append(pools[group].select(order).remove_columns([POSITION]))
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# One source: files -> tokenized rows, with the policies applied.


def _process_group(data, group: str, renderer, tokenizer):
    """All sources of data.sources or data.val_sources, concatenated, with their stats."""
    from datasets import concatenate_datasets

    parts, stats, tokenized = [], [], []
    for i, source in enumerate(getattr(data, group)):
        ds, s = _process_source(source, i, f"data.{group}[{i}]", data, renderer, tokenizer, tokenized)
        parts.append(ds)
        stats.append(s)
    return (concatenate_datasets(parts) if len(parts) > 1 else parts[0]), stats, tokenized


def _process_source(source, index: int, where: str, data, renderer, tokenizer, tokenized_files: list):
    """The source's kept rows; each file's tokenized dataset (the map's output, every row) is appended
    to TOKENIZED_FILES with its source and file index, in the order the rows are concatenated."""
    from datasets import concatenate_datasets

    files = resolve_files(source, where)
    stats = SourceStats(path=source.path, files=[str(f) for f in files] or [source.path])
    parts = []
    for file_index, path in enumerate(files or [None]):
        raw = load_file(path, source, where) if path is not None else load_hub(source, where)
        name = str(path) if path is not None else source.path
        if source.format == "text" and path is not None and path.suffix.lower() == ".txt":
            raw = raw.filter(lambda t: bool(t.strip()), input_columns="text")  # blank lines are not examples
            if len(raw) == 0:
                continue
        tokenized = _tokenize_file(raw, source, where, name, data, renderer, tokenizer)
        # Tagged before the policies drop rows: add_column on a dataset with a row selection would
        # first copy every kept row (datasets flattens the selection), token ids included.
        offset = sum(len(ds) for ds, _, _ in tokenized_files)
        kept = _apply_policies(_tag(tokenized, index, file_index, offset), name, source, where, data, stats)
        if len(kept):
            parts.append(kept)
            tokenized_files.append((tokenized, index, file_index))
    stats.kept = sum(len(p) for p in parts)
    if not parts:
        reasons = [
            (stats.dropped_no_response, f"have no response token within max_seq_len={data.max_seq_len} (raise it)"),
            (stats.dropped_too_long, "are longer than max_seq_len (on_too_long: drop)"),
            (stats.bad_rows, "are bad rows (fix them; the first are listed below)"),
        ]
        why = "; ".join(f"{n} {text}" for n, text in reasons if n) or "it has no rows"
        problems = [Problem(f"{where}.path", f"nothing would be trained from {source.path}: {why}")]
        problems += [Problem(*line.split(": ", 1)) for line in stats.bad_row_examples]
        raise UserError(problems)
    return (concatenate_datasets(parts) if len(parts) > 1 else parts[0]), stats


def _tokenize_file(raw, source, where: str, name: str, data, renderer, tokenizer):
    """One batched map over a file's rows: every output column filled, each row given a status."""
    from datasets import Features, List, Value

    fields = FIELDS[source.format]
    unknown = sorted(set(source.columns) - set(fields))
    if unknown:
        raise UserError.single(
            f"{where}.columns", f"{', '.join(unknown)} is not a field of the {source.format} format ({', '.join(fields)})"
        )
    mapped = [source.columns.get(f, f) for f in fields]
    twice = sorted({c for c in mapped if mapped.count(c) > 1})
    if twice:
        raise UserError.single(f"{where}.columns", f"column {', '.join(twice)} is mapped to two fields: map each once")
    rename = dict(zip(mapped, fields))
    if JSON_COLUMN not in raw.column_names:  # rows read by `datasets`: the columns must be there
        missing = [col for col, f in rename.items() if col not in raw.column_names and f not in OPTIONAL_FIELDS]
        if missing:
            columns = [c for c in raw.column_names if c != ROW_COLUMN]
            raise UserError.single(
                f"{where}.columns",
                f"{name} has no column {', '.join(map(repr, missing))} (columns: {', '.join(columns)}). "
                f"Map your column names, e.g. columns: {{{fields[0]}: your_column}}",
            )
    features = Features(
        {
            "input_ids": List(Value("int32")),
            "labels": List(Value("int32")),
            "row": Value("int64"),
            "length": Value("int32"),  # before truncation
            "trained": Value("int32"),
            "examples": Value("int32"),
            "status": Value("string"),
            "reason": Value("string"),
        }
    )
    procs = min(data.num_proc or min(os.cpu_count() or 1, 8), max(1, len(raw) // ROWS_PER_PROCESS))
    settings = {"fmt": source.format, "rename": rename, "roles": dict(source.roles),
                "train_on_inputs": data.train_on_inputs, "max_seq_len": data.max_seq_len,
                "on_too_long": data.on_too_long}
    # Several processes: the workers inherit the tokenizer rather than each job carrying it pickled
    # (inherit.py: dill took half a second a job for a 32k vocabulary, before the worker could start).
    with inherited(tokenizer) as shipped, _keeping_os_environ():
        return raw.map(
            _tokenize_batch,
            batched=True,
            batch_size=MAP_BATCH,
            num_proc=procs if procs > 1 else None,
            remove_columns=raw.column_names,
            features=features,
            fn_kwargs={**settings, "renderer": renderer, "tokenizer": shipped if procs > 1 else tokenizer},
            load_from_cache_file=False,  # our own cache (cache.py) knows what invalidates a result
            # Named here, or `datasets` names the output by dill-pickling the function's arguments, the
            # tokenizer's whole vocabulary included: a second per file (1.0 CPU-s of 2.7 on 5,000 rows
            # with Mistral's 32k tokenizer), more than the rest of the pipeline beside the tokenizer.
            new_fingerprint=_map_fingerprint(raw, settings, renderer, tokenizer),
            desc=f"Tokenizing {name}",
        )


@contextmanager
def _keeping_os_environ():
    """Put the real os.environ back: datasets 5 replaces it with a copy of itself after starting its
    workers, and whatever holds the real one (rich's Console reads FORCE_COLOR and COLUMNS from it)
    would miss every later change."""
    environ = os.environ
    try:
        yield
    finally:
        os.environ = environ


def _map_fingerprint(raw, settings: dict, renderer, tokenizer) -> str:
    """What names the map's output file: its input (datasets' fingerprint of the rows) and everything
    that shapes the output, hashed cheaply (the tokenizer by its serialized definition)."""
    import hashlib

    from qlora_cli.util.libraries import dataset_fingerprint

    identity = [dataset_fingerprint(raw), settings, repr(renderer.template) if renderer else None,
                data_cache.tokenizer_digest(tokenizer), data_cache.FORMAT_VERSION]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _tokenize_batch(batch, **kwargs):
    """The map function (module level, so worker processes can import it)."""
    # A batch allocates objects per row (rendered messages, the tokenizer's id lists) and no
    # reference cycles, but every allocation counts towards a run of CPython's cyclic collector,
    # which rescans the live objects: pausing it for the batch saves those rescans.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _tokenize_rows(batch, **kwargs)
    finally:
        if enabled:
            gc.enable()


def _tokenize_rows(batch, fmt, rename, roles, renderer, tokenizer, train_on_inputs, max_seq_len, on_too_long):
    # One output per example: a row is usually one example, a failed row one (with its status), and a
    # conversation may become several: one per turn its template rewrites (Renderer.examples), or one
    # per reply where a token straddles an earlier reply's start (tokenize.encode).
    failed = []  # (row, status, reason)

    def fail(i: int, exc: Exception) -> None:
        if isinstance(exc, UnmappedRole):
            failed.append((i, UNMAPPED_ROLE, ",".join(exc.roles)))
        elif isinstance(exc, TemplateMismatch):
            failed.append((i, TEMPLATE, str(exc)))
        else:
            failed.append((i, BAD, str(exc)))

    canonical = []  # (row, example)
    for i in range(len(batch[ROW_COLUMN])):
        try:
            canonical.append((i, to_canonical(_row(batch, i, rename), fmt, roles)))
        except (UnmappedRole, BadRow) as exc:
            fail(i, exc)
    # The batch's conversations rendered together (Renderer.examples_many): one call to the renderer.
    chats = [(i, ex) for i, ex in canonical if "text" not in ex]
    rendered_of = dict(zip((i for i, _ in chats), renderer.examples_many(
        [(ex["messages"], ex.get("tools")) for _, ex in chats]))) if chats else {}
    texts, spans, text_rows = [], [], []
    for i, example in canonical:
        rendered = [(example["text"], None)] if "text" in example else rendered_of[i]
        if isinstance(rendered, Exception):  # the row's TemplateMismatch or BadRow
            fail(i, rendered)
            continue
        try:
            for text, _ in rendered:
                _check_encodable(text)
        except BadRow as exc:
            fail(i, exc)
            continue
        for text, row_spans in rendered:
            texts.append(text)
            spans.append(row_spans)
            text_rows.append(i)
    failed.sort(key=lambda f: f[0])  # in row order, as the rows are read

    # A batch comes from one source, so its rows are all plain text or all conversations.
    if not texts:
        encoded = Encoded(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(0, np.int64), np.zeros(0, np.int64))
    elif spans[0] is None:
        encoded = encode_text(tokenizer, texts)
    else:
        encoded = encode(tokenizer, texts, spans, train_on_inputs)
    source = encoded.source if encoded.source is not None else np.arange(len(texts))
    # Outputs: the encoded examples, then one per failed row (with no tokens).
    row_of = [text_rows[k] for k in source] + [i for i, _, _ in failed]
    status = [OK] * len(source) + [state for _, state, _ in failed]
    reason = [""] * len(source) + [why for _, _, why in failed]
    per_row = Counter(row_of)
    lengths = np.concatenate([encoded.lengths, np.zeros(len(failed), np.int64)])
    for i in np.flatnonzero(lengths > max_seq_len):
        if status[i] == OK and on_too_long not in ("truncate", "split"):
            status[i], reason[i] = TOO_LONG, f"{lengths[i]} tokens, more than max_seq_len={max_seq_len}"
    columns = _token_columns(encoded.ids, encoded.trained, lengths, max_seq_len, split=on_too_long == "split")
    for i in np.flatnonzero(columns["trained"].to_numpy() == 0):
        if status[i] == OK:
            status[i] = NO_RESPONSE
    turns = [per_row[r] if k < len(source) else 0 for k, r in enumerate(row_of)]  # examples of its row
    return pa.table(
        {
            "input_ids": columns["input_ids"],
            "labels": columns["labels"],
            "row": pa.array([batch[ROW_COLUMN][i] for i in row_of], pa.int64()),
            "length": pa.array(lengths, pa.int32()),  # before truncation
            "trained": columns["trained"],
            "examples": pa.array(turns, pa.int32()),  # examples its row became
            "status": pa.array(status, pa.string()),
            "reason": pa.array(reason, pa.string()),
        }
    )


def _check_encodable(text: str) -> None:
    """A lone surrogate (from a broken \\uXXXX escape) makes a row bad: the tokenizer cannot take it."""
    at = lone_surrogate(text)
    if at is not None:
        raise BadRow(
            f"holds a lone surrogate {text[at]!r} (half of a UTF-16 pair without the other half, from a broken "
            f"\\u escape), which is not text; it follows {text[max(0, at - 30):at]!r}"
        )


def _token_columns(ids, trained, lengths, max_seq_len: int, split: bool = False) -> dict:
    """input_ids, labels and trained-token counts of a flat batch, each row cut to max_seq_len.

    Rows longer than max_seq_len are cut whatever the policy (under `drop` or `error` they are removed
    afterwards anyway), except under `split`: those are kept whole, and TRL's bfd_split packing cuts
    them into max_seq_len blocks. Built as Arrow arrays straight from numpy: converting Python lists
    of ids to Arrow was a tenth of the whole pipeline's time.
    """
    kept = lengths if split else np.minimum(lengths, max_seq_len)
    if not split and (lengths > max_seq_len).any():  # most batches have no row to cut: no per-token arrays
        position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # place in its row
        keep = position < max_seq_len
        ids, trained = ids[keep], trained[keep]
    else:
        trained = trained.copy()
    offsets = np.concatenate([[0], np.cumsum(kept)])
    # Where a sequence starts (each example; under split, each block) its label is never a target:
    # it would be predicted from whatever precedes it in a packed row, another example's last token.
    if split:
        trained[(np.arange(len(ids)) - np.repeat(offsets[:-1], kept)) % max_seq_len == 0] = False
    else:
        trained[offsets[:-1][kept > 0]] = False
    labels = np.where(trained, ids, np.int32(IGNORE_INDEX))
    total = np.concatenate([[0], np.cumsum(trained, dtype=np.int64)])  # trained tokens before each position
    counts = (total[offsets[1:]] - total[offsets[:-1]]).astype(np.int32)
    offsets = pa.array(offsets.astype(np.int32))
    return {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
        "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
        "trained": pa.array(counts),
    }


def _row(batch, i: int, rename: dict) -> dict:
    """Row i of a batch in the format's field names."""
    if JSON_COLUMN in batch:
        if batch[BAD_COLUMN][i] is not None:  # the reader could not even keep its text
            raise BadRow(batch[BAD_COLUMN][i])
        try:
            record = json.loads(batch[JSON_COLUMN][i])
        except json.JSONDecodeError as exc:
            raise BadRow(f"malformed JSON: {exc.msg} at character {exc.pos + 1}") from None
        if not isinstance(record, dict):
            raise BadRow(f"expected a JSON object, got {type(record).__name__}")
        row = {f: record.get(col) for col, f in rename.items()}
    else:
        record = None
        row = {f: batch[col][i] for col, f in rename.items() if col in batch}
    missing = [(col, f) for col, f in rename.items() if row.get(f) is None and f not in OPTIONAL_FIELDS]
    if missing:
        cells = record.items() if record is not None else ((c, batch[c][i]) for c in batch if c != ROW_COLUMN)
        present = {c: value for c, value in cells if value is not None}
        unread = [c for c in present if c not in rename]
        if unread:  # the row has its own names for the fields: a mapping reads them
            field = missing[0][1]
            alike = [c for c in unread if isinstance(present[c], list) == (field in ("messages", "conversations"))]
            raise BadRow(
                f"has no column {', '.join(repr(c) for c, _ in missing)} (the row's columns: {', '.join(present)}). "
                f"Map your column names with the source's columns:, e.g. columns: {{{field}: {(alike or unread)[0]}}}"
            )
        # else a row that lacks a field the others have: to_canonical says which
    return row


def _apply_policies(ds, name: str, source, where: str, data, stats: SourceStats):
    """Count and act on row statuses: stop on fatal ones, skip or stop on bad rows, drop the rest."""
    # Whole columns as numpy arrays (a byte or a few per row), never as Python objects per row: the
    # statuses as one small code each, the reasons read only for the few rows a message names.
    status_column = _column(ds, "status", arrow=True).dictionary_encode()
    names = status_column.dictionary.to_pylist()
    codes = status_column.indices.to_numpy(zero_copy_only=False)
    rows = _column(ds, "row")
    counts = {}
    for code, value in enumerate(names):
        counts[value] = int((codes == code).sum())

    def where_status(value: str) -> np.ndarray:
        return np.flatnonzero(codes == names.index(value)) if counts.get(value) else np.zeros(0, dtype=np.int64)

    def reasons(indices) -> list[str]:
        return _column(ds, "reason", arrow=True).take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()

    examples = _column(ds, "examples")
    stats.rows += len(np.unique(rows))  # row numbers are unique in a file; a split row has several outputs
    stats.split_rows += len(np.unique(rows[examples > 1]))
    label = row_label(name, source)

    def located(indices) -> list[Problem]:
        shown = indices[:MAX_REPORTED]
        return [Problem(f"{name}: {label} {rows[i]}", why) for i, why in zip(shown, reasons(shown))]

    if counts.get(UNMAPPED_ROLE):
        unmapped = where_status(UNMAPPED_ROLE)
        found = Counter(role for r in reasons(unmapped) for role in r.split(","))
        first = unmapped[0]
        listed = ", ".join(f"{role!r} ({n} rows)" for role, n in found.most_common())
        example = ", ".join(f"{role}: {'assistant' if 'call' in role else 'tool'}" for role in found)
        raise UserError.single(
            f"{where}.roles",
            f"{name} uses tool-call roles that are not mapped: {listed}, first at {label} {rows[first]}. Say what "
            f"each becomes, e.g. roles: {{{example}}} (assistant turns are trained; tool results are not). They "
            "are never dropped silently",
        )
    if counts.get(TEMPLATE):
        first = where_status(TEMPLATE)[0]
        raise UserError([Problem(f"{name}: {label} {rows[first]}", reasons([first])[0])], header=f"{where}:")
    if counts.get(BAD):
        bad = where_status(BAD)
        problems = located(bad)
        more = len(bad) - len(problems)
        if data.on_bad_row == "error":
            header = f"{len(bad)} bad row(s) in {name} ({where}); fix or remove them, or set data.on_bad_row: skip" + (
                f" ({more} more not shown):" if more else ":"
            )
            raise UserError(problems, header=header)
        stats.bad_rows += len(bad)
        stats.bad_row_examples += [p.render() for p in problems]
    if counts.get(TOO_LONG):
        if data.on_too_long == "error":
            long = where_status(TOO_LONG)
            more = len(long) - min(len(long), MAX_REPORTED)
            header = (
                f"{len(long)} example(s) in {name} are longer than data.max_seq_len={data.max_seq_len} "
                "(data.on_too_long: error). Raise max_seq_len, or set on_too_long to truncate or drop"
                + (f" ({more} more not shown):" if more else ":")
            )
            raise UserError(located(long), header=header)
        stats.dropped_too_long += counts.get(TOO_LONG, 0)
    stats.dropped_no_response += counts.get(NO_RESPONSE, 0)
    lengths = _column(ds, "length")
    ok = codes == names.index(OK) if OK in names else np.zeros(len(codes), dtype=bool)
    long = int(((lengths > data.max_seq_len) & ok).sum())
    if data.on_too_long == "split":
        stats.split_documents += long
    else:
        stats.truncated += long
    keep = np.flatnonzero(ok)
    ds = ds.select(keep) if len(keep) < len(ds) else ds
    return ds.remove_columns(DROPPED_COLUMNS)


def _column(ds, name: str, arrow: bool = False):
    """A whole column at once: numbers as a numpy array, strings as a list (or, with ARROW, as an
    Arrow array: strings then stay out of Python objects).

    (datasets 5's `ds[name]` is a lazy Column that numpy reads one row at a time: 100x slower. And
    after `select`, `shuffle` or a split, datasets gathers the rows of an indices mapping one slice
    at a time; one Arrow `take` over the underlying table does the same in a single vectorized call.)
    """
    values = ds.data.column(name)
    order = dataset_row_order(ds)  # the row order `select`/`shuffle` set; no public accessor exists
    if order is not None:
        values = values.take(order.column(0))
    values = values.combine_chunks()
    if arrow:
        return values
    return values.to_pylist() if values.type == "string" else values.to_numpy(zero_copy_only=False)


def _tag(ds, source: int, file: int, offset: int):
    """The source and file columns, and POSITION (counted from OFFSET), on a dataset with no row selection."""
    n = len(ds)
    ds = ds.add_column("source", pa.array(np.full(n, source, np.int64)))
    ds = ds.add_column("file", pa.array(np.full(n, file, np.int64)))
    return ds.add_column(POSITION, pa.array(np.arange(offset, offset + n, dtype=np.int64)))


# ---------------------------------------------------------------------------------------------
# Mixing, statistics.


def _mix(pool, sources, stats: list[SourceStats], seed: int):
    """Each source's rows sampled to its weight or count, then all shuffled together (seeded)."""
    rng = np.random.default_rng(seed)
    source_of = _column(pool, "source")
    picks = []
    for i, source in enumerate(sources):
        rows = np.flatnonzero(source_of == i)
        if len(rows) == 0:
            stats[i].used = 0
            continue
        if source.samples is not None:
            n = source.samples
        elif source.weight is not None:
            n = max(1, round(len(rows) * source.weight))
        else:
            n = len(rows)
        repeats, rest = divmod(n, len(rows))
        picks.append(np.concatenate([np.tile(rows, repeats), rng.choice(rows, rest, replace=False)]))
        stats[i].used = n
    order = rng.permutation(np.concatenate(picks)) if picks else np.array([], dtype=int)
    return pool.select(order)


def _fill_totals(stats: DataStats, train, val, data, batch_size: int, seed: int, packing: bool) -> None:
    all_sources = stats.sources + stats.val_sources
    stats.train_rows = len(train)
    stats.val_rows = len(val) if val is not None else 0
    if not data.val_sources and val is not None:  # validation rows held out of the training sources
        for i, n in Counter(_column(val, "source").tolist()).items():
            stats.sources[i].held_out = n
    lengths = trained_lengths(train, data)
    stats.train_tokens = int(lengths.sum())
    stats.trained_tokens = int(_column(train, "trained").sum())
    stats.bad_rows = sum(s.bad_rows for s in all_sources)
    stats.bad_row_examples = [e for s in all_sources for e in s.bad_row_examples][:MAX_REPORTED]
    stats.truncated = sum(s.truncated for s in all_sources)
    stats.split_documents = sum(s.split_documents for s in all_sources)
    stats.blocks = len(lengths) if data.on_too_long == "split" else 0
    stats.dropped_too_long = sum(s.dropped_too_long for s in all_sources)
    stats.dropped_no_response = sum(s.dropped_no_response for s in all_sources)
    stats.split_rows = sum(s.split_rows for s in all_sources)
    stats.lengths = length_percentiles(lengths)
    stats.histogram = length_histogram(lengths, data.max_seq_len)
    stats.batching = batching_efficiency(lengths, data.max_seq_len, batch_size, seed, packing=packing)


def trained_lengths(train, data) -> np.ndarray:
    """The length of each sequence the trainer sees: examples cut to max_seq_len, or under
    on_too_long: split, each example's max_seq_len blocks (where TRL's bfd_split cuts them, so
    best-fit packing of these lengths gives the trainer's bins)."""
    lengths = _column(train, "length").astype(np.int64)
    if data.on_too_long != "split":
        return np.minimum(lengths, data.max_seq_len)
    full, rest = np.divmod(lengths, data.max_seq_len)
    blocks = np.repeat(np.full(len(lengths), data.max_seq_len), full)
    return np.concatenate([blocks, rest[rest > 0]])


def length_percentiles(lengths) -> dict:
    if len(lengths) == 0:
        return {}
    q = np.percentile(lengths, [50, 90, 99])
    return {
        "min": int(lengths.min()),
        "p50": int(q[0]),
        "p90": int(q[1]),
        "p99": int(q[2]),
        "max": int(lengths.max()),
        "mean": round(float(lengths.mean()), 1),
    }


def length_histogram(lengths, max_seq_len: int, bins: int = 8) -> list[list[int]]:
    """[[lowest, highest, count], ...]: equal-width bins over the data's own range (its shortest to its
    longest example, capped at max_seq_len), inclusive bounds. Bins over 1..max_seq_len put short data
    (10-40 tokens with max_seq_len 2048) in one bar; fewer bins when there are fewer distinct lengths."""
    lengths = np.asarray(lengths)
    if lengths.size == 0:
        return []
    lo, hi = int(min(lengths.min(), max_seq_len)), int(min(lengths.max(), max_seq_len))
    bins = max(1, min(bins, hi - lo + 1))
    edges = np.linspace(lo, hi + 1, bins + 1).round().astype(int)  # bins [edge_i, edge_i+1), each >= 1 wide
    counts, _ = np.histogram(np.minimum(lengths, max_seq_len), bins=edges)
    return [[int(lo), int(hi) - 1, int(c)] for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def batching_efficiency(lengths, max_seq_len: int, batch_size: int, seed: int, packing: bool = True) -> dict:
    """Fraction of real tokens in the padded batch tensors, without packing and (PACKING) with it.

    Without packing, each batch is padded to its longest example (batches drawn in a seeded random
    order, as the trainer does). With packing, TRL packs examples best-fit-decreasing into rows of
    max_seq_len, so the fraction is the packed rows' fill.
    """
    if len(lengths) == 0:
        return {}
    # Batches of the shuffled lengths, each padded to its longest: one reduceat over the whole array
    # (a list of one small array per batch cost about 0.2 KB a row at a million rows).
    shuffled = np.asarray(lengths, dtype=np.int64)[np.random.default_rng(seed).permutation(len(lengths))]
    starts = np.arange(0, len(shuffled), batch_size)
    longest = np.maximum.reduceat(shuffled, starts)
    padded = int((longest * np.diff(np.append(starts, len(shuffled)))).sum())
    figures = {
        "batch_size": batch_size,
        "padding_efficiency": round(float(lengths.sum()) / padded, 4),
        "batches_per_epoch": int(np.ceil(len(lengths) / batch_size)),
    }
    if not packing:
        return figures
    import pyarrow as pa
    from datasets import Dataset
    from trl import pack_dataset

    # TRL's packing looks only at the lengths, so it packs rows of the right lengths whose values are
    # nulls (Arrow stores no buffer for them) rather than copying every token id: same bins, in the
    # same order and map batches as the trainer will pack, for a fraction of the time.
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    shapes = pa.LargeListArray.from_arrays(pa.array(offsets), pa.nulls(int(offsets[-1])))
    packed = pack_dataset(Dataset(pa.table({"input_ids": shapes})), max_seq_len, "bfd")
    release_freed_memory()  # the packing's freed buffers, back from pyarrow's allocator
    return {
        **figures,
        "packed_rows": len(packed),
        "packing_efficiency": round(float(lengths.sum()) / (len(packed) * max_seq_len), 4),
        "packed_batches_per_epoch": int(np.ceil(len(packed) / batch_size)),
    }
