"""Check `qlora estimate`'s weight part against real 4-bit loads on this machine.

    .venv/bin/python benchmarks/bench_estimate.py

For the tiny model and a medium random Llama (about 0.5 B parameters, built locally from a
config), it loads the base exactly as training does (4-bit NF4 + double quantization, then
peft's prepare_model_for_kbit_training) and compares the bytes its tensors hold (parameters,
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
    import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="qlora-estimate-"))
    tiny = build_tiny.build(tmp / "tiny") / "model"
    medium = medium_model(tmp / "medium")
    results = [measure(tiny, "float32"), measure(medium, "bfloat16"),
               measure(tiny, "bfloat16", "fsdp"), measure(medium, "bfloat16", "fsdp")]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
