"""Padding efficiency: the fraction of real tokens in the batches the trainer sees, packing off and on.

    .venv/bin/python benchmarks/bench_padding.py [../shared/data/alpaca_en_demo.json] [--max-seq-len 2048]
        [--batch-size 4] [--json OUT]

configs/tiny.yaml pointed at the data file (alpaca format, all rows trained: data.val_size=0,
data.max_seq_len as given, the recipe default 2048), with the tiny tokenizer, goes through
`qlora_cli.train.run.build_trainer`: qlora's own pipeline, TRL's packing and collator, the trainer's own
dataloader (seeded random order). One epoch of `trainer.get_train_dataloader()` is iterated and
counted, for packing off and on, and compared with what the pipeline predicts (`stats.batching`).

Definitions (TRL 1.16):
  - packing off: batches are padded to their longest row, with an attention mask. Efficiency =
    sum of attention_mask / sum of input_ids sizes (batch x longest) over the epoch.
  - packing on ("bfd", padding-free): TRL packs examples best-fit-decreasing into rows of at most
    max_seq_len tokens, and its collator concatenates a batch's rows into one [1, total] sequence
    with position ids restarting per example, so the batch tensor holds no padding at all (that
    fraction is 1 by construction). What packing can waste is room in the rows: efficiency = real
    tokens / (packed rows x max_seq_len), i.e. how full each row of max_seq_len is, which sets the
    tokens per step. The packed rows are counted as the collator receives them.
Target: >= 0.97 packed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"
TARGET = 0.97


class CountingCollator:
    """Wraps the trainer's collator to see each batch's rows (packs) before TRL flattens them."""

    def __init__(self, inner):
        self.inner = inner
        self.rows = 0
        self.row_tokens = 0

    def __call__(self, examples):
        self.rows += len(examples)
        self.row_tokens += sum(len(e["input_ids"]) for e in examples)
        return self.inner(examples)


def build(data: Path, max_seq_len: int, batch_size: int, packing: bool, work: Path):
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.train.run import build_trainer

    overrides = [f"data.sources[0].path={data}", f"data.max_seq_len={max_seq_len}", "data.val_size=0", "train.eval_steps=null",
                 f"data.packing={str(packing).lower()}", f"train.batch_size={batch_size}",
                 "model.name_or_path=" + str(ROOT / "build" / "tiny" / "model")]
    recipe = load_recipe(ROOT / "configs" / "tiny.yaml", overrides=overrides)
    return build_trainer(recipe, RunDir(work / ("packed" if packing else "padded")), display="quiet")


def count_epoch(setup, max_seq_len: int) -> dict:
    """Iterate one epoch of the trainer's own dataloader and count real tokens against the tensors."""
    trainer = setup.trainer
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter  # get_train_dataloader builds its DataLoader with this collator
    batches = real = tensor = examples = 0
    for batch in trainer.get_train_dataloader():
        batches += 1
        tensor += batch["input_ids"].numel()
        if "attention_mask" in batch:  # padded to the longest row
            real += int(batch["attention_mask"].sum())
            examples += batch["input_ids"].shape[0]
        else:  # padding-free: every position is a real token; examples start where positions restart
            real += batch["input_ids"].numel()
            examples += int((batch["position_ids"] == 0).sum())
    assert counter.row_tokens == real, "the collator's rows and the batches disagree"
    out = {"batches": batches, "examples": examples, "real_tokens": real, "batch_tensor_tokens": tensor,
           "real_fraction_of_batch_tensors": round(real / tensor, 4)}
    if "attention_mask" not in batch:
        out.update(packed_rows=counter.rows, row_capacity_tokens=counter.rows * max_seq_len,
                   efficiency=round(real / (counter.rows * max_seq_len), 4))
    else:
        out["efficiency"] = out["real_fraction_of_batch_tensors"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT_DATA))
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4, help="rows per batch (default 4, as the Mistral recipe)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qlora-padding-"))
    os.environ["QLORA_CACHE_DIR"] = str(work / "cache")  # leave the user's data cache alone
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = Path(args.data).resolve()
    result = {"data": str(data), "max_seq_len": args.max_seq_len, "batch_size": args.batch_size,
              "target_packed": TARGET}
    for packing in (False, True):
        setup = build(data, args.max_seq_len, args.batch_size, packing, work)
        measured = count_epoch(setup, args.max_seq_len)
        stats = setup.data.stats
        result["packed" if packing else "padded"] = measured
        result["predicted"] = stats.batching  # the pipeline's figures (same for both: it predicts both)
        result["rows"] = stats.train_rows
        result["truncated"] = stats.truncated
        result["lengths"] = stats.lengths
    packed, padded, predicted = result["packed"], result["padded"], result["predicted"]
    result["met"] = packed["efficiency"] >= TARGET
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"{result['rows']} rows of {data.name} (tokens per row: {result['lengths']}, {result['truncated']} truncated), "
          f"max_seq_len {args.max_seq_len}, batch {args.batch_size}:")
    print(f"  packing off: {padded['efficiency']:.4f} real tokens in the padded batches ({padded['batches']} batches; "
          f"pipeline predicted {predicted['padding_efficiency']:.4f})")
    print(f"  packing on: {packed['efficiency']:.4f} of the {packed['packed_rows']} packed rows of {args.max_seq_len} "
          f"filled ({packed['batches']} batches; pipeline predicted {predicted['packing_efficiency']:.4f}); "
          f"target >= {TARGET}: {'met' if result['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
