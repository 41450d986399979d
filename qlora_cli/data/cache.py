"""The tokenized-dataset cache: reuse a finished pipeline run when nothing that shapes it changed.

    k = key(recipe.data, seed, tokenizer, template)
    load(k)                      # (parts, orders, stats) or None
    store(k, parts, orders, stats)

An entry holds each source file's tokenized rows as the pipeline's map wrote them (every row, kept
or not; linked, or copied, never read), and the train and validation sets as row positions in
them: `parts` is {group: [(dataset, source index, file index), ...]}, `orders` {"train" | "val":
(group, positions)}. The pipeline assembles the datasets from those (pipeline._assemble). Storing
the shuffled rows themselves would read every token id through the memory map, and keep them all
in the process's RSS (1 GB per 200,000 Alpaca rows).

A stale cache is worse than none: training on last week's data, or on rows rendered with a
template you have since fixed, fails silently (axolotl PR#462, PR#1136). So the key is a hash of
everything the result depends on:
  - the bytes of every data file (not its modification time, which copies keep) and its path, and,
    for hub datasets, their fingerprint;
  - the template's text and stop token;
  - the tokenizer's full definition (vocabulary, merges, normalizer, added and special tokens);
  - every data setting in the recipe and the seed (which picks the validation rows and the mix);
    train.batch_size only shapes the padding statistics, which are recomputed on a hit instead;
  - FORMAT_VERSION, bumped whenever the pipeline's output changes.

Entries live under $QLORA_CACHE_DIR (default ~/.cache/qlora)/data/<key>, written to a temporary
directory and renamed, so a crash never leaves a half-written entry that a later run would trust.
"""

from __future__ import annotations
from qlora_cli.util.files import sha256_file

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FORMAT_VERSION = 6  # 6: the tokenized files and the row orders (no copy of the rows); 2: histogram bins as [lo, hi, count]; trained-token counts exclude position 0
# 4: the seam policy (tokenize.py), one example per rewritten turn, tool calls; split_rows and notes
# 5: no label at an example's first token (packed rows); on_too_long: split keeps long rows whole
# 3: a row with a lone surrogate is a bad row (in a JSON array, ujson had silently deleted the character)

# Data settings that do not change the tokenized rows: toggling them must not cost a rebuild.
# (packing happens later, inside TRL; num_proc only changes speed; cache is this switch.)
NOT_IN_KEY = {"cache", "num_proc", "packing"}


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE_DIR") or Path.home() / ".cache" / "qlora") / "data"


def key(data, seed: int, tokenizer, template) -> str:
    """A hex digest over everything the tokenized dataset depends on."""
    from qlora_cli.data.sources import is_hub_id, resolve_files

    settings = data.model_dump(mode="json", exclude=NOT_IN_KEY)
    files = []
    for group in ("sources", "val_sources"):
        for i, source in enumerate(getattr(data, group)):
            if is_hub_id(source.path):
                files.append([source.path, _hub_fingerprint(source, f"data.{group}[{i}]")])
            else:
                files.extend([str(f), sha256_file(f)] for f in resolve_files(source, f"data.{group}[{i}]"))
    parts = {
        "version": FORMAT_VERSION,
        "data": settings,
        "seed": seed,
        "files": files,
        "template": [template.name, template.jinja, template.stop] if template is not None else None,
        "tokenizer": tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_digest(tokenizer) -> str:
    """Hash of the tokenizer's definition; two tokenizers that tokenize alike hash alike."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    h.update(json.dumps([type(tokenizer).__name__, special], sort_keys=True).encode())
    return h.hexdigest()


def load(k: str):
    """(parts, orders, stats dict) from the cache, or None when there is no complete entry."""
    import numpy as np
    from datasets import Dataset, concatenate_datasets, load_from_disk

    entry = cache_root() / k
    if not (entry / "stats.json").is_file():
        return None
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        parts = {}
        for group, files in manifest["parts"].items():
            parts[group] = []
            for j, part in enumerate(files):
                where = entry / "parts" / group / str(j)
                if part["shards"] is None:
                    ds = load_from_disk(str(where))
                else:
                    shards = [Dataset.from_file(str(where / name)) for name in part["shards"]]
                    ds = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
                if len(ds) != part["rows"]:
                    return None
                parts[group].append((ds, part["source"], part["file"]))
        orders = {name: (group, np.load(entry / name / "order.npy")) for name, group in manifest["orders"].items()}
        stats = json.loads((entry / "stats.json").read_text())
    except Exception:  # an unreadable entry is a miss, not a failure: it is rebuilt and replaced
        return None
    return parts, orders, stats


def store(k: str, parts: dict, orders: dict, stats: dict) -> None:
    """Write an entry atomically (temporary directory, then rename). A failure to cache is not fatal."""
    import numpy as np

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{k}.", dir=root))
        manifest = {"parts": {}, "orders": {}}
        for group, files in parts.items():
            manifest["parts"][group] = []
            for j, (ds, source, file) in enumerate(files):
                where = tmp / "parts" / group / str(j)
                shards = [f["filename"] for f in ds.cache_files]
                if shards and _whole_files(ds, shards):
                    where.mkdir(parents=True)
                    names = [f"shard-{i:05d}.arrow" for i in range(len(shards))]
                    for shard, name in zip(shards, names):
                        _link_or_copy(Path(shard), where / name)
                else:  # rows in memory (a file read row by row): written out, nothing memory-mapped to touch
                    names = None
                    ds.save_to_disk(str(where))
                manifest["parts"][group].append({"source": source, "file": file, "rows": len(ds), "shards": names})
        for name, (group, order) in orders.items():
            (tmp / name).mkdir()
            np.save(tmp / name / "order.npy", np.asarray(order, dtype=np.int64))
            manifest["orders"][name] = group
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        (tmp / "stats.json").write_text(json.dumps(stats))  # last: its presence marks a complete entry
        target = root / k
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None


def _whole_files(ds, shards: list[str]) -> bool:
    """Whether DS is exactly its cache files' rows, in order (a map's output: no selection, no added column)."""
    from qlora_cli.util.libraries import dataset_row_order

    if dataset_row_order(ds) is not None:
        return False
    try:
        import pyarrow as pa

        rows = 0
        for shard in shards:
            with pa.memory_map(shard) as f:
                rows += pa.ipc.open_stream(f).read_all().num_rows
    except Exception:
        return False
    return rows == len(ds) and set(ds.data.column_names) == set(ds.column_names)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no bytes written; the map's own copy may be deleted later, the data stays) or,
    across file systems, a copy made by the kernel (never read into this process)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _hub_fingerprint(source, where: str) -> str:
    # `datasets` fingerprints a loaded split from its cached files, so a new revision changes it.
    from qlora_cli.data.sources import load_hub
    from qlora_cli.util.libraries import dataset_fingerprint

    return dataset_fingerprint(load_hub(source, where))
