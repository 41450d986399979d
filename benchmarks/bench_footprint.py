"""4-bit memory footprint: the bytes a loaded model holds against the NF4 + double-quant theory.

    .venv/bin/python benchmarks/bench_footprint.py [--work DIR] [--json OUT]

Loads two models in 4 bits on the CPU with qlora's own loader (NF4, as `qlora train` does), with
and without double quantization: the tiny model (scripts/build_tiny.py) and a random medium Llama
built locally from a config (hidden 1536, 12 layers, 32k vocabulary, bf16: about 0.5 B parameters,
as benchmarks/bench_estimate.py). For each, qlora_cli.model.footprint gives:
  - measured: bytes held by parameters, buffers and bitsandbytes' quant states (absmax, nested
    absmax, lookup tables, offset);
  - theoretical: 4 bits per quantized weight plus block scales (4.127 bits with double quant, 4.5
    without) plus per-matrix lookup tables, and every other tensor at its dtype's size;
  - bits per quantized weight (measured), and transformers' get_memory_footprint(), which leaves
    the quant states out.
Target: measured within 3% of theoretical. --work keeps the built medium model for the next run.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
TARGET = 0.03


def medium_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def measure(name: str, model_dir: Path, dtype: str, double_quant: bool) -> dict:
    from qlora_cli.recipe.load import validate_recipe
    from qlora_cli.model.footprint import footprint
    from qlora_cli.model.load import load_base_model

    recipe = validate_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": dtype},
        "quant": {"compute_dtype": dtype, "double_quant": double_quant},
        "data": {"sources": [{"path": "unused.jsonl", "format": "alpaca"}]},
    })
    model = load_base_model(recipe.model, recipe.quant)
    result = footprint(model)
    result["get_memory_footprint"] = model.get_memory_footprint()
    del model
    gc.collect()
    within = abs(result["ratio"] - 1) <= TARGET
    print(f"{name} ({dtype}, double quant {'on' if double_quant else 'off'}): measured "
          f"{result['measured_bytes']:,} B, theoretical {result['theoretical_bytes']:,} B, ratio {result['ratio']:.4f} "
          f"(target within {TARGET:.0%}): {'met' if within else 'NOT met'}; "
          f"{result['bits_per_quantized_param']:.4f} bits per quantized weight; get_memory_footprint() "
          f"{result['get_memory_footprint']:,} B (+{result['quant_state_bytes']:,} B of quant states)", flush=True)
    return {"model": name, "dtype": dtype, **result, "met": within}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="directory for the built models (kept; default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    import build_tiny

    work = Path(args.work or tempfile.mkdtemp(prefix="qlora-footprint-"))
    tiny = work / "tiny" / "model"
    if not (tiny / "config.json").is_file():
        build_tiny.build(work / "tiny")
    medium = medium_model(work / "medium")
    results = [measure(name, path, dtype, dq)
               for name, path, dtype in (("tiny", tiny, "float32"), ("medium 0.5B", medium, "bfloat16"))
               for dq in (True, False)]
    met = all(r["met"] for r in results)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)  # about 1 GB of medium model
    print(f"measured within {TARGET:.0%} of theoretical for all {len(results)} loads: {'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"target_fraction": TARGET, "met": met, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
