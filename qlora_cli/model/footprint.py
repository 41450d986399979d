"""Memory footprint of a loaded 4-bit model: what its tensors hold, against what theory says.

    from qlora_cli.model.footprint import footprint
    footprint(model)   # {"measured_bytes", "theoretical_bytes", "ratio", "bits_per_quantized_param", ...}

Works on any torch module holding bitsandbytes 4-bit weights (a transformers model loaded with
`load_in_4bit`, or the PeftModel around one). A quantized weight is a `Params4bit`: a uint8 tensor
of packed 4-bit codes, two per byte, whose `quant_state` (bitsandbytes' QuantState) holds the rest:

  - absmax: one scale per block of `blocksize` (64) weights. Without double quantization it is
    fp32: 4 + 32/64 = 4.5 bits per weight;
  - with double quantization (QLoRA's "double quant"), absmax is itself quantized blockwise to
    8 bits (a uint8 per block) minus its mean (`offset`, one fp32), with one fp32 scale per 256
    blocks (`state2.absmax`): 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight;
  - lookup tables, per quantized tensor: the 16-entry NF4/FP4 `code` (fp32, 64 bytes) and, with
    double quantization, the 256-entry 8-bit dynamic map `state2.code` (fp32, 1 KiB).

`bits_per_quantized_param` is the per-weight part (codes + absmax + nested absmax), the figure the
QLoRA paper quotes. The lookup tables are a fixed cost per tensor: negligible for real models, but
on a toy model (4k-weight matrices) they outweigh what double quantization saves.

transformers' `model.get_memory_footprint()` counts parameters and buffers only, so it leaves out
the QuantState tensors (0.127 bits per quantized weight on top of the packed 4 with double quant,
3.2% more; 0.5 bits, 12.5%, without): measured_bytes = get_memory_footprint() + quant_state_bytes,
when no tensor is shared.

Measure a model as it trains. On AVX512-BF16 CPUs bitsandbytes can repack a 4-bit weight after a
first no-grad forward (qlora turns that off: modeling.disable_cpu_weight_repacking); a repacked
weight keeps bf16 absmax and no double quantization (4.25 bits), which this theory does not price.
"""

from __future__ import annotations

import torch

FP32 = 4  # bytes: absmax without double quant, nested absmax, offset and the lookup tables are fp32
NF4_CODE_ENTRIES = 16  # the 4-bit lookup table (nf4 or fp4)
DYNAMIC_CODE_ENTRIES = 256  # the 8-bit dynamic map used to quantize absmax (double quant)


def _quantized(model) -> list[torch.Tensor]:
    """The 4-bit weights: parameters carrying a bitsandbytes quant_state (no bitsandbytes import)."""
    return [p for p in model.parameters() if getattr(p, "quant_state", None) is not None]


def _quant_state_tensors(state) -> list[torch.Tensor]:
    """Every tensor a QuantState holds: absmax, code, offset, and the nested state's absmax and code."""
    tensors = [state.absmax, state.code, state.offset]
    if getattr(state, "state2", None) is not None:
        tensors += _quant_state_tensors(state.state2)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _nbytes(tensors) -> int:
    """Bytes held by these tensors, each distinct tensor counted once (tied weights, shared tables)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.device, t.data_ptr(), t.numel(), t.dtype) if t.data_ptr() else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quantized_params(model) -> int:
    """Number of weights stored in 4 bits (the real shapes; a Params4bit's numel() counts packed bytes)."""
    return sum(p.quant_state.shape.numel() for p in _quantized(model))


def quant_state_bytes(model) -> int:
    """Bytes held by the QuantStates: the part `get_memory_footprint()` does not see."""
    return _nbytes(t for p in _quantized(model) for t in _quant_state_tensors(p.quant_state))


def measured_4bit_bytes(model) -> int:
    """Real bytes held by parameters, buffers and the 4-bit weights' quant states."""
    held = [*model.parameters(), *model.buffers()]
    held += [t for p in _quantized(model) for t in _quant_state_tensors(p.quant_state)]
    return _nbytes(held)


def nf4_theory(n: int, double_quant: bool, blocksize: int = 64, nested_blocksize: int = 256) -> tuple[float, float]:
    """(per-weight bytes, per-tensor constant bytes) of one n-weight tensor in 4 bits.

    Per weight: the packed codes plus one absmax per block, in 8 bits plus an fp32 per nested block
    with double quantization, else fp32. Per tensor: the NF4/FP4 lookup table, and with double
    quantization the 8-bit map and the offset. `qlora estimate` prices weights with this too.
    """
    blocks = n / blocksize
    constants = NF4_CODE_ENTRIES * FP32
    if double_quant:
        per_weight = n / 2 + blocks * 1 + blocks / nested_blocksize * FP32
        constants += DYNAMIC_CODE_ENTRIES * FP32 + FP32  # the 8-bit map and the offset
    else:
        per_weight = n / 2 + blocks * FP32
    return per_weight, constants


def _theoretical_quantized(n: int, state, double_quant: bool | None = None) -> tuple[float, float]:
    """nf4_theory for a loaded tensor: the block sizes come from its QuantState (64 and 256 by
    default); `double_quant` overrides whether absmax is double-quantized, to price the same model
    the other way."""
    nested = getattr(state, "state2", None) is not None if double_quant is None else double_quant
    nested_blocksize = state.state2.blocksize if getattr(state, "state2", None) is not None else 256
    return nf4_theory(n, nested, state.blocksize, nested_blocksize)


def theoretical_4bit_bytes(model, double_quant: bool | None = None) -> int:
    """What the model should hold: each 4-bit weight at 4 bits plus its share of the block scales
    (4.127 bits per weight with double quantization, 4.5 without) plus the per-tensor lookup tables
    and offset; every other parameter and buffer at its dtype's size.

    double_quant: None = as the model was loaded; True/False = price it with/without double quant.
    """
    quantized = _quantized(model)
    ids = {id(p) for p in quantized}
    other = _nbytes([p for p in model.parameters() if id(p) not in ids] + list(model.buffers()))
    total = float(other)
    for p in quantized:
        per_weight, constants = _theoretical_quantized(p.quant_state.shape.numel(), p.quant_state, double_quant)
        total += per_weight + constants
    return round(total)


def bits_per_quantized_param(model, measured: bool = True) -> float:
    """Bits per 4-bit weight: packed codes + absmax + nested absmax, lookup tables and offset left out.

    measured=True reads the real tensors (rounded up to whole blocks); False gives the formula's value.
    """
    quantized = _quantized(model)
    n = quantized_params(model)
    if not n:
        return 0.0
    if measured:
        tensors = list(quantized)
        for p in quantized:
            s = p.quant_state
            tensors.append(s.absmax)
            if getattr(s, "state2", None) is not None:
                tensors.append(s.state2.absmax)
        return 8 * _nbytes(tensors) / n
    return 8 * sum(_theoretical_quantized(p.quant_state.shape.numel(), p.quant_state)[0] for p in quantized) / n


def footprint(model) -> dict:
    """Measured and theoretical bytes of a loaded 4-bit model, with their ratio (measured / theoretical).

    Also: quantized_params, bits_per_quantized_param (measured), quant_state_bytes (what
    get_memory_footprint() leaves out) and double_quant (whether the model was loaded with it).
    """
    from qlora_cli.model.architectures import quantized_fraction

    measured, theoretical = measured_4bit_bytes(model), theoretical_4bit_bytes(model)
    quantized = _quantized(model)
    coverage = quantized_fraction(model)
    return {
        # The share of the transformer blocks' matrix weights really held in 4 bits (architectures.py).
        "block_weights_4bit_fraction": round(coverage.fraction, 5),
        "block_weights": coverage.total,
        "block_weights_full_precision": coverage.full_precision,
        "measured_bytes": measured,
        "theoretical_bytes": theoretical,
        "ratio": round(measured / theoretical, 5) if theoretical else None,
        "bits_per_quantized_param": round(bits_per_quantized_param(model), 4),
        "quantized_params": quantized_params(model),
        "quant_state_bytes": quant_state_bytes(model),
        "double_quant": any(getattr(p.quant_state, "state2", None) is not None for p in quantized),
    }
