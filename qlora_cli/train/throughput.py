"""How fast a run went, in tokens/s and in model FLOP/s (the figure to compare with a GPU's peak).

    per_token = flops_per_token(peft_model, mean_sequence_length=412)
    achieved_tflops(tokens=1.2e6, seconds=300, per_token=per_token)

QLoRA's arithmetic differs from full fine-tuning's familiar 6 x parameters per token: the frozen
4-bit base needs its forward pass (2 FLOPs per weight) and the gradient with respect to its
inputs (another 2), but no weight gradient; only the adapter's weights (and modules_to_save) get
all three (6). Attention scores add 12 x layers x width x sequence length per token (forward and
backward of QK^T and AV, counted over the full square as PaLM's MFU convention does). The
recomputation of gradient checkpointing is not counted: these are model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

import torch


def _linear_sizes(model) -> tuple[int, int]:
    """(frozen base weights, trainable weights) over the model's linear layers, 4-bit ones included."""
    frozen = trainable = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None:
            continue  # bitsandbytes' Linear4bit and PEFT's lora_A/lora_B are nn.Linear subclasses
        if ".original_module" in name:
            continue  # modules_to_save keeps the original beside the trained copy; only the copy runs
        size = module.in_features * module.out_features
        if weight.requires_grad:
            trainable += size
        else:
            frozen += size
    return frozen, trainable


def flops_per_token(model, mean_sequence_length: float) -> float:
    """Model FLOPs to train on one token (forward + backward), for a PEFT model on a 4-bit base."""
    frozen, trainable = _linear_sizes(model)
    config = model.config
    layers = getattr(config, "num_hidden_layers", 0)
    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    width = heads * head_dim  # the width of QK^T and AV (not always hidden_size)
    attention = 12 * layers * width * mean_sequence_length
    return 4 * frozen + 6 * trainable + attention


def achieved_tflops(tokens: int, seconds: float, per_token: float) -> float | None:
    """Model TFLOP/s over a run (None when nothing was timed)."""
    if not tokens or seconds <= 0:
        return None
    return tokens * per_token / seconds / 1e12
