"""`qlora estimate`: peak training memory from the recipe and the model's config.json alone.

    est = estimate(load_recipe("configs/mistral7b_alpaca.yaml"))
    est.total_gib, est.parts            # {"NF4 weights + quantization constants": bytes, ...}

Nothing is downloaded but config.json: the model is built on the meta device, and transformers'
own bitsandbytes quantizer marks which linear layers training holds in 4 bits (as `qlora merge`
does), so the split between quantized and full-precision weights is the one training gets.

The parts, in bytes:
  - NF4 weights: 4 bits per parameter, plus one absmax per 64-weight block, which double
    quantization stores in 8 bits with an fp32 constant per 256 blocks (4.127 bits per parameter
    in all; 4.5 without double quantization);
  - the rest of the base (embeddings, norms, lm_head), in fp32: peft's
    `prepare_model_for_kbit_training` upcasts them;
  - LoRA (and modules_to_save) parameters in fp32, their gradients, and the optimizer state
    (8 bytes per parameter for 32-bit Adam, 2 for 8-bit Adam, 0 for SGD);
  - activations for batch x sequence: with gradient checkpointing, one hidden state per layer is
    kept plus one layer's working set being recomputed; without, every layer's working set. The
    fp32 logits and their gradient come on top (large for big vocabularies);
  - a fixed runtime overhead (CUDA context and allocator slack).

The weight part is checked against the measured footprint of real loads (scripts/bench_estimate.py);
the activation part is an engineering approximation, stated as such in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
BLOCK, DQ_BLOCK = 64, 256  # bitsandbytes 4-bit block size, and double quantization's second level
RUNTIME_OVERHEAD = 0.75 * GIB  # CUDA context + allocator slack on a GPU
OPTIMIZER_BYTES = {  # per trainable parameter
    "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8,
    "adamw_8bit": 2, "paged_adamw_8bit": 2,
    "adafactor": 4,  # factored second moment: a rough upper bound for adapter-sized matrices
    "sgd": 0,
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # label -> bytes
    quantized_params: int = 0
    other_params: int = 0
    trainable_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def weights(self) -> float:
        """The base model's footprint once loaded: the part checked against measurements."""
        return self.parts["NF4 weights + quantization constants"] + self.parts["unquantized base weights (fp32)"]


def nf4_bytes(n: int, double_quant: bool) -> float:
    blocks = n / BLOCK
    scales = blocks * 1 + blocks / DQ_BLOCK * 4 if double_quant else blocks * 4
    return n / 2 + scales


def estimate(recipe, gpu: bool = True) -> Estimate:
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig

    from qlora_cli.merge_weights import quantized_meta_model
    from qlora_cli.modeling import TORCH_DTYPES

    m, q, lora, t, d = recipe.model, recipe.quant, recipe.lora, recipe.train, recipe.data
    config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    model = quantized_meta_model(config, q, TORCH_DTYPES[m.dtype])
    quantized_names = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    tied = getattr(model, "all_tied_weights_keys", None)
    est = Estimate()
    seen = set()
    quantized_bytes = other = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name in quantized_names:
            est.quantized_params += p.numel()
            quantized_bytes += nf4_bytes(p.numel(), q.double_quant)
        else:
            est.other_params += p.numel()
            other += p.numel() * 4
    est.parts["NF4 weights + quantization constants"] = quantized_bytes
    est.parts["unquantized base weights (fp32)"] = other

    # Trainable: LoRA factors on the targeted linear layers, plus full copies of modules_to_save.
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    if lora.target_modules == "all-linear":
        targets = [n for n in linears if f"{n}.weight" in quantized_names]
    else:
        targets = [n for n in linears if n.split(".")[-1] in lora.target_modules]
    trainable = sum(lora.r * (linears[n].in_features + linears[n].out_features) for n in targets)
    if lora.use_dora:
        trainable += sum(linears[n].out_features for n in targets)
    modules = dict(model.named_modules())
    for wanted in lora.modules_to_save:
        for name, mod in modules.items():
            if name.split(".")[-1] == wanted:
                trainable += sum(p.numel() for p in mod.parameters())
    est.trainable_params = trainable
    est.parts["trainable parameters (fp32)"] = trainable * 4
    est.parts["gradients (fp32)"] = trainable * 4
    est.parts[f"optimizer state ({t.optimizer})"] = trainable * OPTIMIZER_BYTES[t.optimizer]

    # Activations, per micro-batch of batch_size x max_seq_len tokens, in the compute dtype.
    tokens = t.batch_size * d.max_seq_len
    act = DTYPE_BYTES[q.compute_dtype]
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    layers = config.num_hidden_layers
    # One decoder layer's saved tensors per token: the attention block (norm input/output, q, k, v,
    # attention output, o_proj input) ~ 6 hidden, and a gated MLP (gate, up, act, product) ~ 4
    # intermediate, plus residuals and LoRA inputs ~ 4 hidden. SDPA/flash keep no seq x seq matrix.
    per_layer = tokens * act * (10 * hidden + 4 * inter)
    if t.gradient_checkpointing:
        est.parts["activations (checkpointed)"] = layers * tokens * act * hidden + per_layer
    else:
        est.parts["activations"] = layers * per_layer
    est.parts["logits + their gradient (fp32)"] = 2 * tokens * config.vocab_size * 4
    if gpu:
        est.parts["runtime overhead (CUDA context, allocator)"] = RUNTIME_OVERHEAD
    if tied:
        est.notes.append("tied input/output embeddings are counted once")
    return est


def suggestions(recipe, est: Estimate) -> list[str]:
    """What to change, largest saving first, when the estimate exceeds the budget."""
    t, d, lora = recipe.train, recipe.data, recipe.lora
    out = []
    act = sum(v for k, v in est.parts.items() if k.startswith(("activations", "logits")))
    if not t.gradient_checkpointing:
        out.append("train.gradient_checkpointing: true (keeps one hidden state per layer instead of all activations)")
    if t.batch_size > 1:
        out.append(f"train.batch_size: {max(1, t.batch_size // 2)} and train.gradient_accumulation_steps: "
                   f"{t.gradient_accumulation_steps * 2} (same effective batch, about {act / 2 / GIB:.1f} GiB less)")
    if d.max_seq_len > 512:
        out.append(f"data.max_seq_len: {d.max_seq_len // 2} (halves activations; check truncation with `qlora data`)")
    if "8bit" not in t.optimizer and t.optimizer != "sgd":
        out.append("train.optimizer: paged_adamw_8bit (optimizer state 2 bytes per parameter instead of 8)")
    if lora.r > 8:
        out.append(f"lora.r: {lora.r // 2} (halves adapter, gradient and optimizer memory)")
    return out
