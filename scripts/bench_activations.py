"""Check the activation part of `qlora estimate` on the CPU: the bytes autograd saves for backward.

    .venv/bin/python scripts/bench_activations.py [--batch 2] [--seq 256] [--json out.json]

Peak training memory on a GPU is weights + optimizer state + what the forward pass keeps for the
backward pass + transients. The last two are what the estimate's activation formula predicts, and
the saved part is device-independent: autograd's saved-tensor hooks see every tensor a QLoRA
forward keeps (the same layers, LoRA, 4-bit matmuls and losses run on the CPU). This script loads a
random Llama-shaped model (hidden 1024, 4 layers, 32k vocab, built locally) exactly as training
does (4-bit NF4 + LoRA r=16 on all linear layers, no checkpointing), runs one forward with labels
under the compute dtype's autocast, and counts the distinct storages saved, excluding the weights:

  - per decoder layer, against the estimate's activations divided by the layers (estimate.activation_parts);
  - everything after the last layer (final norm, lm_head, loss), against the estimate's saved loss
    term (fp32 log-probabilities and lm_head's compute-dtype copy; the estimate adds the logits'
    gradients, which are not saved but live during backward).

What it cannot see: transients that are not saved (a 4-bit weight dequantized for one matmul,
attention kernels' workspace) and the allocator's slack. Those, and the whole peak, need a GPU
(scripts/bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)


def build_model(out: Path, dtype, shape: dict) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(dtype).save_pretrained(out)
    return out


class SavedBytes:
    """Counts distinct storages autograd saves while `active`, leaving out the given ones (weights)."""

    def __init__(self, excluded: set[int]):
        self.excluded, self.storages, self.active = excluded, {}, False

    def pack(self, t):
        if self.active:
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in self.excluded:
                self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def take(self) -> int:
        total, self.storages = sum(self.storages.values()), {}
        return total


def measure(batch: int, seq: int, dtype_name: str, shape: dict = SHAPE) -> dict:
    import torch

    from qlora_cli.config import validate_recipe
    from qlora_cli.estimate import LOSS_SAVED, estimate
    from qlora_cli.footprint import _quant_state_tensors, _quantized
    from qlora_cli.modeling import attach_lora, load_base_model

    dtype = getattr(torch, dtype_name)
    tmp = Path(tempfile.mkdtemp(prefix="qlora-activations-"))
    model_dir = build_model(tmp / "model", dtype, shape)
    recipe = validate_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": dtype_name},
        "quant": {"compute_dtype": dtype_name},
        # No LoRA dropout: on the CPU its masks are float (4 bytes an element), on a GPU bool (1 byte,
        # which is what the estimate adds when dropout > 0), so it is left out of the comparison.
        "lora": {"r": 16, "target_modules": "all-linear", "dropout": 0.0},
        "data": {"sources": [{"path": "unused.jsonl", "format": "alpaca"}], "max_seq_len": seq},
        "train": {"batch_size": batch, "gradient_checkpointing": False},
    })
    est = estimate(recipe, gpu=False)
    model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=False)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {t.untyped_storage().data_ptr() for p in _quantized(model) for t in _quant_state_tensors(p.quant_state)}
    counter = SavedBytes(weights)

    layers = model.get_base_model().model.layers
    per_layer = []
    for layer in layers:  # count each decoder layer's saves separately
        layer.register_forward_pre_hook(lambda *_: setattr(counter, "active", True))
        layer.register_forward_hook(lambda *_: per_layer.append(counter.take()) or setattr(counter, "active", False))
    norm = model.get_base_model().model.norm
    norm.register_forward_pre_hook(lambda *_: setattr(counter, "active", True))  # final norm, lm_head, loss

    ids = torch.randint(0, shape["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
    head = counter.take()
    loss.backward()  # the graph is whole: the saves counted are the ones backward uses

    config = model.get_base_model().config
    predicted_layer = est.parts["activations"] / config.num_hidden_layers
    measured_layer = sorted(per_layer)[len(per_layer) // 2]
    predicted_head = est.parts[LOSS_SAVED]
    return {
        "batch": batch, "seq": seq, "dtype": dtype_name, "hidden": config.hidden_size,
        "intermediate": config.intermediate_size, "vocab": config.vocab_size,
        "layer_saved_bytes_measured": per_layer, "layer_saved_bytes_predicted": predicted_layer,
        "layer_ratio": round(predicted_layer / measured_layer, 4),
        "head_saved_bytes_measured": head, "head_saved_bytes_predicted": predicted_head,
        "head_ratio": round(predicted_head / head, 4),
        "saved_total_ratio": round((est.parts["activations"] + predicted_head) / (sum(per_layer) + head), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    result = measure(args.batch, args.seq, args.dtype)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
