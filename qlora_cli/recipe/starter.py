"""`qlora init`: a commented starter recipe, one per data format, that validates as written.

Only the keys a user is likely to change are written, each with a comment; everything else takes
the schema's defaults (`qlora validate RECIPE` prints the fully resolved recipe). The precision and
the optimizer suit the machine `qlora init` runs on (a GPU, or only a CPU); a comment on each says
what to write on the other kind.
"""

from __future__ import annotations

# The data file each format expects, and one example row, shown in the comment above `sources`.
EXAMPLES = {
    "alpaca": ("data/train.jsonl", '{"instruction": "Add 2 and 3.", "input": "", "output": "5"}'),
    "sharegpt": ("data/train.jsonl", '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}'),
    "messages": ("data/train.jsonl", '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}'),
    "prompt_completion": ("data/train.jsonl", '{"prompt": "2 + 3 =", "completion": " 5"}'),
    "text": ("data/train.txt", "plain text; each line is an example (see sample_by)"),
}
FORMATS = tuple(EXAMPLES)


# What differs between a GPU machine and a CPU-only one: (model.dtype and quant.compute_dtype, the
# optimizer), each with its comment naming the other machine's value. bitsandbytes' paged optimizers
# need a GPU (on a CPU they warn and fall back), and bf16 matmuls are slow on most CPUs.
MACHINE = {
    True: ("bfloat16", "float16 on GPUs without bf16 (before Ampere); float32 on a CPU-only machine",
           "paged_adamw_8bit", "the QLoRA paper's; on a CPU-only machine use adamw_torch (paged ones need a GPU)"),
    False: ("float32", "no GPU here: bf16 is slow on most CPUs; on a GPU use bfloat16 (float16 before Ampere)",
            "adamw_torch", "no GPU here: paged optimizers need one; on a GPU use paged_adamw_8bit (8-bit state)"),
}


def starter_recipe(model: str, fmt: str, gpu: bool = True) -> str:
    """The starter recipe for MODEL and data format FMT, for a machine with a GPU or without one."""
    path, example = EXAMPLES[fmt]
    dtype, dtype_note, optimizer, optimizer_note = MACHINE[gpu]
    template_line = {
        "alpaca": "  # template: alpaca        # the default for alpaca data; also chatml, llama3, tokenizer, or a .jinja file",
        "sharegpt": "  template: chatml           # or llama3, tokenizer (the model's own), or a path to a .jinja file",
        "messages": "  template: chatml           # or llama3, tokenizer (the model's own), or a path to a .jinja file",
        "prompt_completion": "  # template: raw           # the default: prompt and completion joined as they are",
        "text": "  # text is trained as plain text: no template",
    }[fmt]
    return f"""# yaml-language-server: $schema=recipe.schema.json
# Starter recipe written by `qlora init`. Check it with `qlora validate THIS_FILE`, look at the data
# with `qlora data THIS_FILE`, train with `qlora train THIS_FILE`. For editor completion, write the
# schema beside it: `qlora schema > recipe.schema.json`. Every key: docs/recipe.md in the repository.

model:
  name_or_path: {model}    # hub id or a local directory with config.json
  dtype: {dtype:<19} # {dtype_note}

quant:                       # the QLoRA paper's settings: 4-bit NF4, double quantization
  quant_type: nf4
  double_quant: true
  compute_dtype: {dtype:<11} # match model.dtype

lora:
  r: 16                      # capacity of the update; 8-64 is typical
  alpha: 32                  # the update is scaled by alpha / r
  dropout: 0.05
  target_modules: all-linear # every linear layer, as in the QLoRA paper

data:
  sources:
    # one row: {example}
    - path: {path}
      format: {fmt}
{template_line}
  max_seq_len: 2048          # longer examples are truncated (on_too_long: truncate | drop | error)
  val_size: 0.05             # share of rows held out for eval loss; or a count, e.g. 200

train:
  epochs: 3
  learning_rate: 2.0e-4
  batch_size: 4              # per device; lower it first if memory runs out
  gradient_accumulation_steps: 4
  optimizer: {optimizer:<15} # {optimizer_note}
  gradient_checkpointing: true
  eval_steps: 100
  save_steps: 200            # checkpoints: `qlora train THIS_FILE --resume` continues from the newest

output:
  dir: runs/my-run
"""
