"""What an architecture means for 4-bit training: which of its weights really are in 4 bits.

    with plain_linears(config.model_type):   # around from_pretrained / from_config
        model = AutoModelForCausalLM.from_pretrained(..., quantization_config=...)
    coverage = quantized_fraction(model)      # .fraction, .quantized, .total, .full_precision
    require_4bit(coverage, "model.name_or_path")   # UserError below MIN_FRACTION, naming the modules

transformers' bitsandbytes integration (5.23) swaps a module for a 4-bit one only when its type is
exactly `nn.Linear` (or GPT-2's `Conv1D`), and bitsandbytes (0.50) quantizes nothing else. Two kinds
of model slip through, and then train in 16/32 bits while the tool says 4:
  - a subclass of nn.Linear. Falcon's `FalconLinear` only re-implements nn.Linear's forward
    (`x @ W.T + b`), so it is built as a plain nn.Linear while the model is created: same weights,
    same names, same arithmetic, and now quantized (`plain_linears`);
  - Mixture-of-Experts models (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek): transformers 5 stores each
    layer's experts as fused 3-D tensors (`experts.gate_up_proj`, `experts.down_proj`), about 90% of
    the weights, which bitsandbytes cannot quantize (bitsandbytes issue 1849, open). They are refused
    with what they would really take, rather than trained mostly in 16 bits.

The measure is the fraction of the transformer blocks' matrix weights (every tensor of two or more
dimensions inside a decoder layer) held in 4 bits. Dense models have 100%: everything in a block
but the norms is a linear layer. MIN_FRACTION is set well below that and well above what an
architecture with a whole class of matrices left out has (an MoE model keeps about 10%).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field

from qlora_cli.errors import UserError

# Below this, a run would be a 16-bit run in name only (see the module docstring).
MIN_FRACTION = 0.9

# NF4 with double quantization: 4 bits + 8/64 for the block's absmax + 32/(64*256) (footprint.py).
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8

# model_type -> (module, class): nn.Linear subclasses whose forward is nn.Linear's own arithmetic.
PLAIN_LINEAR_SUBCLASSES = {
    "falcon": ("transformers.models.falcon.modeling_falcon", "FalconLinear"),
}


@contextlib.contextmanager
def plain_linears(model_type: str | None):
    """While a model of MODEL_TYPE is built, build its plain nn.Linear subclasses as nn.Linear, so
    that transformers' bitsandbytes integration quantizes them."""
    import torch

    found = PLAIN_LINEAR_SUBCLASSES.get(model_type or "")
    if found is None:
        yield
        return
    module = importlib.import_module(found[0])
    original = getattr(module, found[1])
    setattr(module, found[1], torch.nn.Linear)  # the model's __init__ looks the name up in its module
    try:
        yield
    finally:
        setattr(module, found[1], original)


@dataclass
class Coverage:
    """How much of the transformer blocks' matrix weights are in 4 bits."""

    quantized: int = 0  # weights in 4 bits
    total: int = 0  # matrix weights in the blocks, 4-bit or not
    full_precision: dict[str, int] = field(default_factory=dict)  # parameter name pattern -> weights

    @property
    def fraction(self) -> float:
        return self.quantized / self.total if self.total else 1.0

    def left_out(self, n: int = 4) -> str:
        """The largest kinds of weights left in full precision, as 'mlp.experts.down_proj (every layer)'."""
        ranked = sorted(self.full_precision.items(), key=lambda kv: -kv[1])
        return ", ".join(name for name, _ in ranked[:n]) + (f" and {len(ranked) - n} more" if len(ranked) > n else "")


def quantized_fraction(model) -> Coverage:
    """Count a loaded (or meta-device) model's block weights, 4-bit or not. LoRA factors are not counted."""
    import bitsandbytes as bnb

    coverage = Coverage()
    four_bit = set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and _in_block(name):
            four_bit.add(f"{name}.weight")
            coverage.quantized += module.in_features * module.out_features
    coverage.total = coverage.quantized
    for name, p in model.named_parameters():
        if name in four_bit or not _in_block(name) or p.dim() < 2 or "lora_" in name:
            continue
        coverage.total += p.numel()
        pattern = _layer_pattern(name)
        coverage.full_precision[pattern] = coverage.full_precision.get(pattern, 0) + p.numel()
    return coverage


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.2f} MiB"


def require_4bit(coverage: Coverage, where: str, bytes_per_weight: float = 2.0) -> None:
    """Stop when too little of the model is in 4 bits, naming what is not and what it would take."""
    if coverage.fraction >= MIN_FRACTION:
        return
    left = coverage.total - coverage.quantized
    experts = any("expert" in name for name in coverage.full_precision)
    why = (
        "its experts are stored as fused 3-D tensors, which bitsandbytes 0.50 cannot quantize "
        "(bitsandbytes issue 1849)"
        if experts
        else "bitsandbytes quantizes only nn.Linear layers, and these are not"
    )
    raise UserError.single(
        where,
        f"only {coverage.fraction:.1%} of this model's transformer-block weights would be in 4 bits "
        f"({coverage.quantized:,} of {coverage.total:,}): {why}. Left in full precision: {coverage.left_out()}, "
        f"{left:,} weights, {_size(left * bytes_per_weight)} at {bytes_per_weight * 8:.0f} bits instead of "
        f"{_size(left * NF4_BYTES_PER_WEIGHT)} in NF4. qlora will not train it in 16 bits while calling it "
        "4-bit: use a dense model of this family, or full-precision LoRA with another tool",
    )


def _in_block(name: str) -> bool:
    parts = name.split(".")
    return any(part in ("layers", "h", "blocks") and nxt.isdigit() for part, nxt in zip(parts, parts[1:]))


def _layer_pattern(name: str) -> str:
    """'model.layers.3.mlp.experts.down_proj' -> 'mlp.experts.down_proj' (what is left out, in every layer)."""
    parts = name.split(".")
    for i, (part, nxt) in enumerate(zip(parts, parts[1:])):
        if part in ("layers", "h", "blocks") and nxt.isdigit():
            rest = parts[i + 2 :]
            return ".".join(rest[:-1] if rest and rest[-1] == "weight" else rest)
    return name


def check_vocab_fits(tokenizer, rows: int, where: str = "model.name_or_path") -> None:
    """Every token id the tokenizer can produce must have a row in the embedding matrix: one beyond it
    is an IndexError deep inside the forward pass (a tokenizer class that adds a pad token its
    vocabulary lacks, or the tokenizer of another model)."""
    beyond = sorted(i for i in {*range(rows, len(tokenizer)), *tokenizer.added_tokens_decoder} if i >= rows)
    if not beyond:
        return
    names = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} ({i})" for i in beyond[:5])
    more = f" and {len(beyond) - 5} more" if len(beyond) > 5 else ""
    raise UserError.single(
        where,
        f"the tokenizer has {len(beyond)} token(s) beyond the model's embedding matrix ({rows:,} rows): {names}{more}. "
        "Use the tokenizer that came with the model, or resize the embeddings to the tokenizer "
        "(model.resize_token_embeddings) and train them (lora.modules_to_save: [embed_tokens, lm_head])",
    )


def check_target_modules(model, lora, where: str = "lora.target_modules") -> None:
    """Refuse a lora.target_modules name that matches no module of the model, by PEFT's rule for a
    list (a module's whole name, or its last dotted parts), listing the names its linear layers have.
    PEFT itself says only "Target modules {...} not found in the base model", and only once the
    weights are loaded. A string ('all-linear') is left to PEFT."""
    import difflib

    import torch
    from transformers.pytorch_utils import Conv1D

    targets = lora.target_modules
    if isinstance(targets, str):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if not missing:
        return
    head = model.get_output_embeddings()
    linears = list(dict.fromkeys(
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    ))
    named = []
    for t in missing:
        near = difflib.get_close_matches(t, linears, n=1)
        named.append(f"{t!r} (did you mean {near[0]!r}?)" if near else repr(t))
    raise UserError.single(where, (
        f"no module of this model is called {', '.join(named)}. Its linear layers are {', '.join(linears)}: "
        "list some of them, or write all-linear for every one"
    ))


def check_model(recipe, tokenizer=None):
    """What `validate` and `estimate` can know before any weight is read: build the model empty, as a
    training load would quantize it, and check its 4-bit coverage, lora.target_modules (and the
    tokenizer against its embeddings). Returns (the empty model, its Coverage)."""
    from transformers import AutoConfig

    from qlora_cli.model.meta import quantized_meta_model
    from qlora_cli.util.dtypes import torch_dtype

    m = recipe.model
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError.single(
            "model.name_or_path", f"could not read the model's config.json: {str(exc).splitlines()[0]}"
        ) from None
    dtype = torch_dtype(m.dtype)
    model = quantized_meta_model(config, recipe.quant, dtype)
    coverage = quantized_fraction(model)
    require_4bit(coverage, "model.name_or_path", dtype.itemsize)
    check_target_modules(model, recipe.lora)
    if tokenizer is not None:
        check_vocab_fits(tokenizer, model.get_input_embeddings().num_embeddings)
    return model, coverage
