"""A hand-written QLoRA fine-tune with the same libraries `qlora train` uses, for bench_overhead.py.

    .venv/bin/python benchmarks/baseline_sft.py configs/tiny.yaml --output-dir /tmp/baseline [--json OUT]

This is what a user would write without the tool: transformers + bitsandbytes (NF4, double quant),
peft (prepare_model_for_kbit_training + LoRA) and TRL's SFTTrainer on prompt/completion pairs (so
the loss is on the completion only), then the adapter saved. Only the numbers come from the
recipe (`qlora_cli.recipe.load.load_recipe`, a pure pydantic/YAML reader), so both sides train with the
same settings; none of qlora's data pipeline, templates, model loading, trainer subclass or
callbacks is used. Supports alpaca sources only (the tiny recipe's format).

Writes {"train_s": seconds inside trainer.train(), "tokens_seen", "train_rows", ...} to --json and
prints it as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# The Alpaca prompt, verbatim from Stanford Alpaca: the same text qlora's `alpaca` template renders.
PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "uint8": "uint8"}


def alpaca_pair(row: dict, bos: str) -> dict:
    """One Alpaca row as a prompt/completion pair. TRL appends EOS to the completion itself."""
    if row.get("input"):
        prompt = f"{PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}"
    else:
        prompt = f"{PREAMBLE_NO_INPUT}\n\n### Instruction:\n{row['instruction']}"
    # This tokenizer adds no BOS by itself (TRL tokenizes plain text with the tokenizer's defaults),
    # so it goes into the text, as Llama-style training data has it.
    return {"prompt": f"{bos}{prompt}\n\n### Response:\n", "completion": row["output"]}


def load_rows(recipe, bos: str):
    """The recipe's alpaca sources as prompt/completion datasets: (train, validation)."""
    from datasets import Dataset

    rows = []
    for source in recipe.data.sources:
        if source.format != "alpaca":
            raise SystemExit(f"baseline_sft: only alpaca sources are supported, not {source.format}")
        text = Path(source.path).read_text(encoding="utf-8")
        records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
        rows += [alpaca_pair(r, bos) for r in records]
    ds = Dataset.from_list(rows)
    if not recipe.data.val_size:
        return ds, None
    n_val = int(recipe.data.val_size) if recipe.data.val_size >= 1 else recipe.data.val_size
    split = ds.train_test_split(test_size=n_val, seed=recipe.train.seed)
    return split["train"], split["test"]


def load_model(recipe):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q, m = recipe.quant, recipe.model
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, DTYPES[q.compute_dtype]),
        bnb_4bit_quant_storage=getattr(torch, DTYPES.get(q.storage_dtype, "uint8")),  # "auto": uint8 on one device
    )
    model = AutoModelForCausalLM.from_pretrained(
        m.name_or_path,
        quantization_config=bnb_config,
        dtype=getattr(torch, DTYPES[m.dtype]),
        device_map={"": 0} if torch.cuda.is_available() else {"": "cpu"},
        attn_implementation=m.attn_implementation,
    )
    # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights after the first no-grad forward
    # (an evaluation) into a layout whose backward drops the gradient: a correct baseline needs this.
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    model.config.use_cache = False  # the usual QLoRA-script line: no KV cache while training
    return model


def add_lora(model, recipe):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = recipe.lora
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=list(lora.modules_to_save) or None, bias=lora.bias, task_type="CAUSAL_LM",
    ))


def trainer_arguments(recipe, output_dir: str, has_eval: bool) -> dict:
    """The recipe's training settings as transformers.TrainingArguments keywords, shared by this script
    and baseline_trainer.py (SFTConfig takes the same ones), so both baselines train alike."""
    import torch

    t, cuda = recipe.train, torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_eval and t.eval_on_start,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=recipe.quant.compute_dtype == "bfloat16",
        fp16=recipe.quant.compute_dtype == "float16" and cuda,
        use_cpu=not cuda,
        # Only so that the token count can be compared with qlora's summary (tokens_seen).
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,  # as `qlora train --quiet`: nothing printed per step
    )


def sft_config(recipe, output_dir: str, has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(**trainer_arguments(recipe, output_dir, has_eval),
                     max_length=recipe.data.max_seq_len, packing=recipe.data.packing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer, set_seed
    from trl import SFTTrainer

    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(args.recipe)
    set_seed(recipe.train.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, eval_ds = load_rows(recipe, tokenizer.bos_token or "")
    model = add_lora(load_model(recipe), recipe)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, str(Path(args.output_dir) / "checkpoints"), has_eval=eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
    )
    # TRL casts a quantized model's adapters to bf16. Keep them fp32, as qlora does, so both sides do
    # the same arithmetic (bf16 matmuls are a different, and on most CPUs slower, workload).
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()

    start = time.perf_counter()
    output = trainer.train()
    train_s = time.perf_counter() - start
    trainer.save_model(args.output_dir)  # adapter + tokenizer

    evals = [r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r]
    result = {
        "train_s": round(train_s, 3),
        "steps": trainer.state.global_step,
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "train_rows": len(train_ds),
        "val_rows": len(eval_ds) if eval_ds is not None else 0,
        "trained_tokens_per_epoch": sum(sum(1 for x in row if x != -100) - (row[0] != -100)
                                        for row in trainer.train_dataset["labels"]),
        "tokens_per_epoch": sum(len(row) for row in trainer.train_dataset["input_ids"]),
        "mean_train_loss": output.training_loss,
        "first_eval_loss": evals[0] if evals else None,
        "eval_loss": evals[-1] if evals else None,
        # What qlora's summary reports as peak_memory.gpu_allocated_gib (bench_gpu.py compares them).
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
