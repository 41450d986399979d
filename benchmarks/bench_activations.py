"""Check `qlora estimate` on the CPU: the saved activations, and the whole training step's peak.

    .venv/bin/python benchmarks/bench_activations.py [--batch 2] [--seq 256] [--dtype bfloat16] [--json out.json]

Peak training memory on a GPU is weights + optimizer state + what the forward pass keeps for the
backward pass + transients + the CUDA runtime and the allocator's slack. Everything but the last
two is device-independent bytes of live tensors, and a QLoRA step runs the same layers, LoRA,
4-bit matmuls and loss on the CPU. For a random Llama-shaped model (hidden 1024, 4 layers, 32k
vocab, built locally), loaded exactly as training does (4-bit NF4 + LoRA r=16 on all linear
layers, bf16 autocast), it measures:

  1. saved: one forward with labels under autograd's saved-tensor hooks, counting the distinct
     storages saved (weights left out) per decoder layer and after the last layer (final norm,
     lm_head, loss), against estimate.activation_parts;
  2. peak: the peak of live tensor bytes over a whole step (forward, backward, AdamW step, with the
     optimizer state already made by an earlier step), from torch's MemTracker (a dispatch-mode
     tracker; plus the 4-bit quant states, which it cannot see), with and without gradient
     checkpointing, against the estimate's total without the CUDA runtime overhead.

No LoRA dropout: on the CPU its masks are float (4 bytes an element), on a GPU bool (1 byte, which
is what the estimate adds when dropout > 0). What stays unchecked: GPU-only transients (attention
kernels' workspace, cuBLAS), the runtime and the allocator's slack: the whole GPU peak needs a GPU
(benchmarks/bench_gpu.py).
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


def load(batch: int, seq: int, dtype_name: str, shape: dict, checkpointing: bool = False):
    """(recipe, model) for a random model of this shape, loaded and adapted as `qlora train` does."""
    import torch

    from qlora_cli.recipe.load import validate_recipe
    from qlora_cli.model.load import attach_lora, load_base_model

    tmp = Path(tempfile.mkdtemp(prefix="qlora-activations-"))
    model_dir = build_model(tmp / "model", getattr(torch, dtype_name), shape)
    recipe = validate_recipe({
        "model": {"name_or_path": str(model_dir), "dtype": dtype_name},
        "quant": {"compute_dtype": dtype_name},
        "lora": {"r": 16, "target_modules": "all-linear", "dropout": 0.0},  # (see the docstring)
        "data": {"sources": [{"path": "unused.jsonl", "format": "alpaca"}], "max_seq_len": seq},
        "train": {"batch_size": batch, "gradient_checkpointing": checkpointing, "optimizer": "adamw_torch"},
    })
    model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=checkpointing)
    model.train()
    return recipe, model


def measure(batch: int, seq: int, dtype_name: str, shape: dict = SHAPE) -> dict:
    """Saved-for-backward bytes per decoder layer and for the loss, against the estimate."""
    import torch

    from qlora_cli.estimate import LOSS_SAVED, estimate
    from qlora_cli.model.footprint import _quant_state_tensors, _quantized

    dtype = getattr(torch, dtype_name)
    recipe, model = load(batch, seq, dtype_name, shape)
    est = estimate(recipe, gpu=False)
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


def step_peak(batch: int, seq: int, dtype_name: str, checkpointing: bool, shape: dict = SHAPE) -> dict:
    """Peak live tensor bytes over one training step, against the estimate (without the CUDA runtime)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from qlora_cli.estimate import estimate
    from qlora_cli.model.footprint import quant_state_bytes

    dtype = getattr(torch, dtype_name)
    recipe, model = load(batch, seq, dtype_name, shape, checkpointing)
    est = estimate(recipe, gpu=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq))

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state exists from here on, as in every step but the first
    tracker = MemTracker()
    # MemTracker hooks every parameter's gradient; the frozen 4-bit weights have none to hook.
    track = tracker._track_module_params_and_buffers
    tracker._track_module_params_and_buffers = lambda module, install_grad_hooks=True: track(module, False)
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    measured = peak + quant_state_bytes(model)  # QuantState tensors are not parameters: add them
    return {"gradient_checkpointing": checkpointing, "measured_peak_bytes": measured,
            "estimated_bytes": est.total, "ratio": round(est.total / measured, 4),
            "estimate_parts": {k: round(v) for k, v in est.parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    result = {"saved": measure(args.batch, args.seq, args.dtype),
              "peak": [step_peak(args.batch, args.seq, args.dtype, ckpt) for ckpt in (False, True)]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
