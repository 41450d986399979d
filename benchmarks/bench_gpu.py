"""GPU benchmark: `qlora train` against hand-written scripts, and `qlora estimate` against the measured peak.

    python benchmarks/bench_gpu.py --json $OUT/bench_gpu.json                 # Llama-3.2-1B's shape, ~6 min on an H100
    python benchmarks/bench_gpu.py --shape mistral7b --repeats 1 --json ...   # the flagship recipe's shape
    python benchmarks/bench_gpu.py --shape tiny --steps 4 --seq-len 256 --repeats 1   # the plumbing, on a CPU

The model has a public model's dimensions and random weights, built from a config and saved once:
nothing is downloaded (llama1b: Llama-3.2-1B, 1.24 B parameters with its 128,256-entry vocabulary,
where the LM head's logits are a large share of the memory; mistral7b: Mistral-7B-v0.1). The
tokenizer is scripts/build_tiny.py's (any tokenizer will do: the cost per token is the model's).
The rows are --data's Alpaca rows, or, without the file, synthetic ones of about 300 tokens.
Every side trains LoRA r=16 on every linear layer over the 4-bit base, at --seq-len, with gradient
checkpointing, for --steps optimizer steps (the timed loop includes its first, slower step):

  - qlora: `qlora train` with its defaults and speed features: packing (best-fit, padding-free),
    SDPA, non-reentrant checkpointing, TRL's fused LM head (train.loss_path: auto on CUDA), Liger's
    kernels when liger-kernel is installed;
  - trainer: benchmarks/baseline_trainer.py, a plain transformers.Trainer: padded batches, the
    full logits and transformers' loss;
  - sft: benchmarks/baseline_sft.py, TRL's SFTTrainer as its docs write it: padded batches.

Reported per side (medians of --repeats fresh processes, interleaved): trained (non-padding)
tokens/s over the training loop and the peak GPU memory allocated; and `qlora estimate`'s predicted
peak for the tool's recipe beside its measured one. Targets: qlora's peak <= each baseline's, its
tokens/s >= 1.3 x the plain Trainer's, and the estimate within 15% of the measured peak. Also
recorded: the GPU, the library versions and the commands.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

SHAPES = {
    # Llama-3.2-1B's config.json, less the weights (tied embeddings, 128k vocabulary).
    "llama1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True, head_dim=64),
    # Mistral-7B-v0.1's config.json, less the weights.
    "mistral7b": dict(model_type="mistral", tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0,
                      sliding_window=None),
    # A few MB, for checking the script on a CPU.
    "tiny": dict(model_type="llama", tie_word_embeddings=False, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, sliding_window=None),
}
TARGET_SPEEDUP = 1.3
ESTIMATE_TOLERANCE = 0.15
BASELINES = {"trainer": "baseline_trainer.py", "sft": "baseline_sft.py"}


def build_model(shape: str, out: Path) -> Path:
    """A random model of the shape, saved in bf16 with the tiny tokenizer beside it (once per --work)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import build_tiny

    model_dir = out / f"model-{shape}"
    if (model_dir / "config.json").is_file():
        return model_dir
    tiny = build_tiny.build(out / "tiny")
    shape_config = dict(SHAPES[shape])
    config = AutoConfig.for_model(shape_config.pop("model_type"), **shape_config, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    for f in (tiny / "model").iterdir():  # the tokenizer files
        if "token" in f.name or f.name.endswith(".jinja"):
            (model_dir / f.name).write_bytes(f.read_bytes())
    return model_dir


def rows_file(data: Path, work: Path) -> Path:
    """--data if it exists; otherwise 2,000 synthetic Alpaca rows of a few hundred words each."""
    if data.is_file():
        return data
    import random

    rng = random.Random(0)
    words = "the a model data train loss token layer weight memory step batch rank adapter".split()
    out = work / "synthetic_alpaca.jsonl"
    out.write_text("".join(json.dumps({"instruction": " ".join(rng.choices(words, k=40)), "input": "",
                                       "output": " ".join(rng.choices(words, k=rng.randint(100, 400)))}) + "\n"
                           for _ in range(2000)))
    return out


def write_recipe(model_dir: Path, data: Path, work: Path, args, tool: bool) -> Path:
    """One recipe for both sides; the tool's turns on its speed features."""
    import importlib.util

    import torch

    bf16 = torch.cuda.is_available()
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16" if bf16 else "float32",
                  "attn_implementation": "sdpa"},
        "quant": {"compute_dtype": "bfloat16" if bf16 else "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"sources": [{"path": str(data), "format": "alpaca"}], "max_seq_len": args.seq_len,
                 "val_size": 0, "packing": tool},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "gradient_accumulation_steps": 1,
                  "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit" if bf16 else "adamw_torch",
                  "logging_steps": 1, "save_steps": 10**6, "warmup_steps": 0, "warmup_ratio": 0.0,
                  "liger_kernel": tool and bf16 and importlib.util.find_spec("liger_kernel") is not None},
        "output": {"dir": str(work / "run")},
    }
    path = work / ("tool.yaml" if tool else "baseline.yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_tool(recipe: Path, out: Path) -> dict:
    command = [str(Path(sys.executable).with_name("qlora")), "train", str(recipe), "--output-dir", str(out),
               "--overwrite", "--quiet"]
    subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": summary["throughput"]["tokens_per_s"], "tokens": summary["tokens_seen"],
            "train_s": summary["runtime_s"], "peak_gib": summary["peak_memory"].get("gpu_allocated_gib"),
            "model_tflops": summary["throughput"].get("model_tflops"), "command": " ".join(command)}


def estimate(recipe: Path) -> dict:
    """`qlora estimate RECIPE --json`: its predicted peak per GPU, in GiB."""
    command = [str(Path(sys.executable).with_name("qlora")), "estimate", str(recipe), "--json"]
    proc = subprocess.run(command, check=True, capture_output=True, text=True)
    report = json.loads(proc.stdout)
    return {"predicted_gib": round(report["total_bytes"] / 2**30, 3), "command": " ".join(command),
            "parts_gib": {k: round(v / 2**30, 3) for k, v in report["parts_bytes"].items()}
            if isinstance(report.get("parts_bytes"), dict) else report.get("parts_bytes")}


def run_baseline(script: str, recipe: Path, out: Path) -> dict:
    result_file = out.parent / f"{out.name}.json"
    command = [sys.executable, str(ROOT / "benchmarks" / script), str(recipe), "--output-dir", str(out),
               "--json", str(result_file)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    r = json.loads(result_file.read_text())
    return {"tokens_per_s": r["tokens_seen"] / r["train_s"], "tokens": r["tokens_seen"], "train_s": r["train_s"],
            "peak_gib": r.get("peak_gpu_gib"), "command": " ".join(command)}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    out = {"python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama1b")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "alpaca_en_demo.json")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="where the model and runs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.shape, work)
    data = rows_file(args.data, work)
    tool_recipe = write_recipe(model_dir, data, work, args, tool=True)
    base_recipe = write_recipe(model_dir, data, work, args, tool=False)
    predicted = estimate(tool_recipe)
    sides = {"qlora": lambda i: run_tool(tool_recipe, work / f"qlora-{i}"),
             **{name: (lambda i, name=name, script=script: run_baseline(script, base_recipe, work / f"{name}-{i}"))
                for name, script in BASELINES.items()}}
    runs = {side: [] for side in sides}
    order = list(sides)
    for i in range(args.repeats):  # interleaved, rotating, so drifting load or clocks hit every side alike
        for side in order[i % len(order):] + order[:i % len(order)]:
            runs[side].append(sides[side](i))
        print(json.dumps({side: r[-1] for side, r in runs.items()}), flush=True)

    def median(side, key):
        values = [r[key] for r in runs[side] if r.get(key) is not None]
        return statistics.median(values) if values else None

    result = {"shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
              "versions": versions(), "estimate": predicted, "runs": runs}
    for side in runs:
        result[side] = {key: median(side, key) for key in ("tokens_per_s", "peak_gib", "train_s", "model_tflops")}
    tool = result["qlora"]
    result["speedup"] = {name: round(tool["tokens_per_s"] / result[name]["tokens_per_s"], 3) for name in BASELINES}
    result["memory_ok"] = {name: None if None in (tool["peak_gib"], result[name]["peak_gib"])
                           else tool["peak_gib"] <= result[name]["peak_gib"] for name in BASELINES}
    error = None if tool["peak_gib"] is None else predicted["predicted_gib"] / tool["peak_gib"] - 1
    result["estimate_error"] = None if error is None else round(error, 4)
    for name in BASELINES:
        speedup = result["speedup"][name]
        target = f" (target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'})" \
            if name == "trainer" else ""
        print(f"tokens/s: qlora {tool['tokens_per_s']:,.0f}, {name} {result[name]['tokens_per_s']:,.0f} = "
              f"{speedup:.2f}x{target}; peak GiB qlora {tool['peak_gib']}, {name} {result[name]['peak_gib']}")
    if error is not None:
        print(f"qlora estimate: {predicted['predicted_gib']} GiB predicted, {tool['peak_gib']} GiB measured: "
              f"{error:+.1%} (target within {ESTIMATE_TOLERANCE:.0%}: "
              f"{'met' if abs(error) <= ESTIMATE_TOLERANCE else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
