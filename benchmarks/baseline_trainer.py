"""A hand-written QLoRA fine-tune on a plain `transformers.Trainer`, for bench_overhead.py and bench_gpu.py.

    .venv/bin/python benchmarks/baseline_trainer.py configs/tiny.yaml --output-dir /tmp/plain [--json OUT]

The floor for what `qlora train` may cost: the same model loading and LoRA as baseline_sft.py
(transformers + bitsandbytes NF4 with double quant, peft), but no TRL at all. The prompt/completion
pairs are tokenized here the way TRL tokenizes them (prompt + completion + EOS, loss on the
completion only), padded per batch by transformers' DataCollatorForSeq2Seq (labels padded with
-100), and the loss is transformers' own cross-entropy on the model's logits. Nothing is measured
or logged beyond what Trainer does by itself. Supports alpaca sources without packing (the tiny
recipe's shape).

Writes the same JSON as baseline_sft.py: {"train_s", "tokens_seen", "train_rows", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_sft import add_lora, load_model, load_rows, trainer_arguments  # noqa: E402  (the same model and rows as the SFT baseline)


def tokenize(pairs, tokenizer, max_len: int):
    """Prompt/completion pairs -> input_ids and labels (-100 on the prompt), as TRL 1.x does it:
    the prompt is tokenized alone for its length, the whole text once, EOS appended, truncated."""

    def one(row):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"])["input_ids"]
        if ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_len]
        labels = [-100] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return pairs.map(one, remove_columns=pairs.column_names)


def training_args(recipe, output_dir: str, has_eval: bool):
    from transformers import TrainingArguments

    # The same settings as baseline_sft.py's SFTConfig; the collator needs the labels column kept.
    return TrainingArguments(**trainer_arguments(recipe, output_dir, has_eval), remove_unused_columns=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(args.recipe)
    if recipe.data.packing:
        raise SystemExit("baseline_trainer: packing is not supported (the plain Trainer has none)")
    set_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_pairs, eval_pairs = load_rows(recipe, tokenizer.bos_token or "")
    train_ds = tokenize(train_pairs, tokenizer, recipe.data.max_seq_len)
    eval_ds = tokenize(eval_pairs, tokenizer, recipe.data.max_seq_len) if eval_pairs is not None else None
    model = add_lora(load_model(recipe), recipe)
    for p in model.parameters():  # adapters in fp32, as qlora and baseline_sft.py train them
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    trainer = Trainer(
        model=model,
        args=training_args(recipe, str(Path(args.output_dir) / "checkpoints"), has_eval=eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        processing_class=tokenizer,
    )

    start = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(args.output_dir)

    evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    result = {
        "train_s": round(train_s, 3),
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_rows": len(train_ds),
        "val_rows": len(eval_ds) if eval_ds is not None else 0,
        # Trained tokens as qlora counts them: the labels that are not -100 (the model shifts them by one).
        "trained_tokens_per_epoch": sum(sum(1 for x in row if x != -100) - (row[0] != -100)
                                        for row in train_ds["labels"]),
        "tokens_per_epoch": sum(len(row) for row in train_ds["input_ids"]),
        "mean_train_loss": output.training_loss,
        "first_eval_loss": evals[0] if evals else None,
        "eval_loss": evals[-1] if evals else None,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
