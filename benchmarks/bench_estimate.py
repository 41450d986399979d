"""Check `qlora estimate`'s weight part against real 4-bit loads on this machine.

    .venv/bin/python benchmarks/bench_estimate.py
    .venv/bin/python benchmarks/bench_estimate.py --public [--batch 4 --seq 1024] [--loss-path auto]

--public prints the estimate (no load) for Mistral-7B's and Llama-3-8B's published shapes: their
config.json files, written from PUBLIC_SHAPES into a temporary directory, under the shipped
Mistral-7B recipe (configs/mistral7b_alpaca.yaml: batch 4 x 1024) or the given batch and length.

For the tiny model and a medium random Llama (about 0.5 B parameters, built locally from a
config), it loads the base exactly as training does (4-bit NF4 + double quantization, then
attach_lora: peft's prepare_model_for_kbit_training, and the frozen embeddings and lm_head back in
bf16 for a bf16 recipe) and compares the bytes its tensors hold (parameters,
buffers and the 4-bit quant states, qlora_cli/model/footprint.py) with the estimate's weight part. It
also checks the trainable-parameter count against PEFT's. Then the same under
distributed.strategy fsdp, in one process: weights stored in bf16 and no fp32 upcast, which is what
each GPU's shards add up to. Prints JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


# The config.json of two public models, as published on the hub (the fields the estimate reads and
# the ones that make them what they are); nothing is downloaded.
PUBLIC_SHAPES = {
    "Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "max_position_embeddings": 32768, "sliding_window": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "Meta-Llama-3-8B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
}


def write_public_config(name: str, out: Path) -> Path:
    """A directory holding PUBLIC_SHAPES[name] as its config.json (enough for `qlora estimate`)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(PUBLIC_SHAPES[name], indent=2))
    return out


def public_recipe(model_dir: Path, **train) -> dict:
    """configs/mistral7b_alpaca.yaml pointed at model_dir, with train/data overrides (batch_size, max_seq_len)."""
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "mistral7b_alpaca.yaml").read_text())
    raw["model"]["name_or_path"] = str(model_dir)
    if "max_seq_len" in train:
        raw["data"]["max_seq_len"] = train.pop("max_seq_len")
    raw["train"].update(train)
    return raw


def public_estimates(batch: int | None = None, seq: int | None = None, loss_path: str | None = None) -> list[dict]:
    """The estimate's parts (GiB) for each public shape under the shipped Mistral-7B recipe."""
    from qlora_cli.estimate import GIB, estimate
    from qlora_cli.recipe.load import validate_recipe

    tmp = Path(tempfile.mkdtemp(prefix="qlora-public-"))
    overrides = {k: v for k, v in (("batch_size", batch), ("max_seq_len", seq), ("loss_path", loss_path)) if v}
    out = []
    for name in PUBLIC_SHAPES:
        recipe = validate_recipe(public_recipe(write_public_config(name, tmp / name), **dict(overrides)))
        est = estimate(recipe)  # for a GPU, as `qlora estimate` does
        out.append({"model": name, "batch": recipe.train.batch_size, "seq": recipe.data.max_seq_len,
                    "loss_path": recipe.train.loss_path,
                    "parts_gib": {k: round(v / GIB, 3) for k, v in est.parts.items()},
                    "total_gib": round(est.total / GIB, 2), "notes": est.notes})
    return out


def medium_model(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def measure(model_dir: Path, dtype: str, strategy: str = "ddp") -> dict:
    from qlora_cli.recipe.load import validate_recipe
    from qlora_cli.estimate import estimate
    from qlora_cli.model.footprint import measured_4bit_bytes
    from qlora_cli.model.load import attach_lora, load_base_model

    recipe = validate_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": dtype},
        "quant": {"compute_dtype": dtype},
        "lora": {"r": 16, "target_modules": "all-linear"},
        "data": {"sources": [{"path": "unused.jsonl", "format": "alpaca"}]},
        "distributed": {"strategy": strategy},
        # (FSDP cannot save 8-bit optimizer state; the optimizer does not change the weights measured)
        **({"train": {"optimizer": "adamw_torch"}} if strategy == "fsdp" else {}),
    })
    est = estimate(recipe, gpu=False)
    sharded = recipe.distributed.sharded
    if sharded:  # the parts one process holds, shards and all: 4-bit payload, constants, other weights
        weights = sum(v for k, v in est.parts.items() if k.startswith(("NF4", "quantization", "unquantized")))
    else:
        weights = est.weights
    model = load_base_model(recipe.model, recipe.quant)
    peft_model = attach_lora(model, recipe.lora, gradient_checkpointing=False, upcast=not sharded)
    base = peft_model.get_base_model()
    adapters = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" in n)
    measured = measured_4bit_bytes(base) - adapters  # parameters, buffers and the quant states
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return {
        "model": model_dir.name, "strategy": strategy, "storage_dtype": recipe.quant.storage_dtype,
        "quantized_params": est.quantized_params, "other_params": est.other_params,
        "estimated_weights_bytes": round(weights), "measured_weights_bytes": measured,
        "ratio": round(weights / measured, 4),
        "estimated_trainable": est.trainable_params, "peft_trainable": trainable,
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--public", action="store_true", help="estimates for Mistral-7B's and Llama-3-8B's shapes")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--loss-path", choices=["auto", "fused", "plain"])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.public:
        print(json.dumps(public_estimates(args.batch, args.seq, args.loss_path), indent=2))
        return
    import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="qlora-estimate-"))
    tiny = build_tiny.build(tmp / "tiny") / "model"
    medium = medium_model(tmp / "medium")
    results = [measure(tiny, "float32"), measure(medium, "bfloat16"),
               measure(tiny, "bfloat16", "fsdp"), measure(medium, "bfloat16", "fsdp")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
