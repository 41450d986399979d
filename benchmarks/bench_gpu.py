"""GPU benchmark: a Mistral-7B-shaped QLoRA step, `qlora train` against the plain baseline script.

    python benchmarks/bench_gpu.py --data ../shared/data/alpaca_en_demo.json --json $OUT/bench_gpu.json
    python benchmarks/bench_gpu.py --shape tiny --steps 4 --seq-len 256     # the same plumbing on a CPU

The model has Mistral-7B's dimensions (hidden 4096, 32 layers, 32 heads with 8 KV heads, MLP 14336,
vocabulary 32,000) and random weights, built from a config and saved once: nothing is downloaded.
The tokenizer is scripts/build_tiny.py's (any tokenizer will do: the cost per token is the model's).
Both sides train LoRA r=16 on every linear layer over the 4-bit base, at --seq-len, with gradient
checkpointing, for --steps optimizer steps (the timed loop includes its first, slower step on both sides):

  - qlora: `qlora train` with its speed features: packing (best-fit, padding-free), SDPA, non-reentrant
    checkpointing, Liger's kernels when liger-kernel is installed;
  - baseline: benchmarks/baseline_sft.py, what a user writes with the same libraries: padded batches,
    the libraries' defaults.

Reported per side (medians of --repeats fresh processes): trained (non-padding) tokens/s over the
training loop, and the peak GPU memory allocated. Targets: qlora's peak <= the baseline's, and its
tokens/s >= 1.3 x the baseline's. Also recorded: the GPU, the library versions and the commands.
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
    # Mistral-7B-v0.1's config.json, less the weights.
    "mistral7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rope_theta=10000.0,
                      sliding_window=None),
    # A few MB, for checking the script on a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, sliding_window=None),
}
TARGET_SPEEDUP = 1.3


def build_model(shape: str, out: Path) -> Path:
    """A random model of the shape, saved in bf16 with the tiny tokenizer beside it (once per --work)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    import build_tiny

    model_dir = out / f"model-{shape}"
    if (model_dir / "config.json").is_file():
        return model_dir
    tiny = build_tiny.build(out / "tiny")
    config = MistralConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    for f in (tiny / "model").iterdir():  # the tokenizer files
        if "token" in f.name or f.name.endswith(".jinja"):
            (model_dir / f.name).write_bytes(f.read_bytes())
    return model_dir


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


def run_baseline(recipe: Path, out: Path) -> dict:
    result_file = out.parent / f"{out.name}.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "baseline_sft.py"), str(recipe), "--output-dir", str(out),
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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral7b")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "alpaca_en_demo.json")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="where the model and runs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.shape, work)
    tool_recipe = write_recipe(model_dir, args.data, work, args, tool=True)
    base_recipe = write_recipe(model_dir, args.data, work, args, tool=False)
    runs = {"qlora": [], "baseline": []}
    for i in range(args.repeats):  # interleaved, so drifting load or clocks hit both alike
        runs["qlora"].append(run_tool(tool_recipe, work / f"qlora-{i}"))
        runs["baseline"].append(run_baseline(base_recipe, work / f"baseline-{i}"))
        print(json.dumps({side: r[-1] for side, r in runs.items()}), flush=True)

    def median(side, key):
        values = [r[key] for r in runs[side] if r.get(key) is not None]
        return statistics.median(values) if values else None

    result = {"shape": args.shape, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
              "versions": versions(), "runs": runs}
    for side in runs:
        result[side] = {key: median(side, key) for key in ("tokens_per_s", "peak_gib", "train_s", "model_tflops")}
    speedup = result["qlora"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
    result["speedup"] = round(speedup, 3)
    peaks = result["qlora"]["peak_gib"], result["baseline"]["peak_gib"]
    result["memory_ok"] = None if None in peaks else peaks[0] <= peaks[1]
    print(f"tokens/s: qlora {result['qlora']['tokens_per_s']:,.0f}, baseline {result['baseline']['tokens_per_s']:,.0f}"
          f" = {speedup:.2f}x (target >= {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); "
          f"peak GiB qlora {peaks[0]}, baseline {peaks[1]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
