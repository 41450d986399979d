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
  - the rest of the base: the embeddings and lm_head (and any linear layer left unquantized) in
    model.dtype, the norms in fp32. peft's `prepare_model_for_kbit_training` upcasts all of them to
    fp32; training puts the frozen embeddings and head back where it runs under autocast (bf16, or
    fp16 on a GPU: model/load.py frozen_weights_stay_narrow), else all of them stay fp32;
  - LoRA (and modules_to_save) parameters in fp32, their gradients, and the optimizer state
    (8 bytes per parameter for 32-bit Adam, 2 for 8-bit Adam, 0 for SGD);
  - activations for batch x sequence: with gradient checkpointing, one hidden state per layer is
    kept plus one layer's working set being recomputed; without, every layer's working set. The
    loss comes on top, by train.loss_path: the plain loss holds fp32 log-probabilities over the
    whole (batch, seq, vocab) logits and their gradients (large for big vocabularies); TRL's fused
    LM head holds one tile of logits at a time. `auto` takes the fused head on a GPU (CUDA), so an
    estimate for a GPU counts it. See activation_parts for what is counted;
  - a fixed runtime overhead (CUDA context and allocator slack).

With `nproc` GPUs the figures are per GPU. Under DDP each GPU holds all of the above, plus the
gradient buckets DDP all-reduces through. Under FSDP or DeepSpeed ZeRO each GPU keeps 1/nproc of
what the strategy partitions (ZeRO-1 the optimizer state, ZeRO-2 also the gradients, ZeRO-3 and FSDP
also the weights, held in the storage dtype without the fp32 upcast), all of the quantization
constants, and the weights it gathers while computing; offload moves the partitioned parts to CPU RAM
(or NVMe).

The weight part is checked against every byte real loads hold (benchmarks/bench_estimate.py); the
activations against what autograd saves for backward, and the total against a training step's peak
of live tensor bytes, on the CPU (benchmarks/bench_activations.py). Not checked: GPU-only transients,
the CUDA runtime and the allocator's slack, which need a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 2**30
RUNTIME_OVERHEAD = 0.75 * GIB  # CUDA context + allocator slack on a GPU
OPTIMIZER_BYTES = {  # per trainable parameter
    "adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8,
    "adamw_8bit": 2, "paged_adamw_8bit": 2,
    "adafactor": 4,  # factored second moment: a rough upper bound for adapter-sized matrices
    "sgd": 0,
}


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # label -> bytes on each GPU
    offloaded: dict[str, float] = field(default_factory=dict)  # label -> bytes each process keeps in CPU RAM (or NVMe)
    weights: float = 0.0  # the whole base model's footprint once loaded in one process: checked against measurements
    quantized_params: int = 0
    other_params: int = 0
    trainable_params: int = 0
    quantized_fraction: float = 1.0  # of the transformer blocks' matrix weights (architectures.py)
    refused: str | None = None  # why `qlora train` would refuse this model (too little of it in 4 bits)
    fused_saving: float = 0.0  # bytes TRL's fused LM head would hold less than the plain loss counted
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def nf4_bytes(n: int, double_quant: bool, tensors: int = 0) -> float:
    """n weights in `tensors` 4-bit matrices, with their quantization constants (footprint.nf4_theory)."""
    from qlora_cli.model.footprint import nf4_theory

    per_weight, per_tensor = nf4_theory(n, double_quant)
    return per_weight + tensors * per_tensor


def nf4_constants(n: int, double_quant: bool, tensors: int = 0) -> float:
    """Only the quantization constants: absmax (and its nested scales), lookup tables, offsets."""
    return nf4_bytes(n, double_quant, tensors) - n / 2


@dataclass
class _Inventory:
    """The base model's parameters, counted by where they sit: what sharding needs to know."""

    quantized: int = 0  # parameters held in 4 bits
    matrices: int = 0  # how many weight matrices hold them (each has its own lookup tables)
    other: int = 0  # parameters kept in full precision (embeddings, norms, lm_head)
    narrow: int = 0  # of those, the ones training keeps in model.dtype (embeddings, lm_head: keeps_loaded_dtype)
    per_layer: dict = field(default_factory=dict)  # decoder layer index -> [quantized, other]

    def largest_layer(self) -> tuple[int, int]:
        return max(self.per_layer.values(), key=lambda qo: qo[0] / 2 + qo[1], default=(0, 0))

    def outside_layers(self) -> int:
        """Full-precision parameters outside the decoder layers (embeddings, lm_head, final norm)."""
        return self.other - sum(o for _, o in self.per_layer.values())


def estimate(recipe, gpu: bool = True, nproc: int = 1) -> Estimate:
    """Peak memory on each of `nproc` GPUs (one process each) under recipe.distributed.strategy."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoConfig

    from qlora_cli.errors import UserError
    from qlora_cli.model.meta import quantized_meta_model
    from qlora_cli.model.architectures import quantized_fraction, require_4bit
    from qlora_cli.model.load import frozen_weights_stay_narrow, keeps_loaded_dtype
    from qlora_cli.util.dtypes import bytes_per, torch_dtype

    m, q = recipe.model, recipe.quant
    config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    model = quantized_meta_model(config, q, torch_dtype(m.dtype))
    coverage = quantized_fraction(model)
    try:
        require_4bit(coverage, "model.name_or_path", torch_dtype(m.dtype).itemsize)
    except UserError as exc:  # the figures below are still the truth of what loading it would take
        refused = exc.problems[0].message
    else:
        refused = None
    quantized_names = {f"{n}.weight" for n, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)}
    # Tied copy -> source (lm_head.weight -> model.embed_tokens.weight under tie_word_embeddings).
    # A model built from its config is not tied yet (from_pretrained ties it), so both names still
    # hold a parameter of their own here: count the source only, as the loaded model stores it.
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    narrow_names = {f"{n}.{pn}" for n, mod in model.named_modules() if keeps_loaded_dtype(mod)
                    for pn, _ in mod.named_parameters(recurse=False)}
    est = Estimate()
    inv = _Inventory()
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen or name in tied:
            continue
        seen.add(id(p))
        quantized = name in quantized_names
        if quantized:
            inv.quantized += p.numel()
            inv.matrices += 1
        else:
            inv.other += p.numel()
            inv.narrow += p.numel() if name in narrow_names else 0
        layer = _layer_index(name)
        if layer is not None:
            inv.per_layer.setdefault(layer, [0, 0])[0 if quantized else 1] += p.numel()
    est.quantized_params, est.other_params = inv.quantized, inv.other
    est.quantized_fraction, est.refused = coverage.fraction, refused
    # One process: peft's prepare_model_for_kbit_training upcasts the unquantized layers to fp32, and
    # under 16-bit autocast training puts the frozen embeddings and lm_head back (model/load.py).
    narrow_bytes = bytes_per(m.dtype) if frozen_weights_stay_narrow(torch_dtype(q.compute_dtype), cuda=gpu) else 4
    est.weights = (nf4_bytes(inv.quantized, q.double_quant, inv.matrices) + inv.narrow * narrow_bytes
                   + (inv.other - inv.narrow) * 4)
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    est.trainable_params = _trainable_params(recipe, model, linears, quantized_names)

    if recipe.distributed.sharded:  # even in one process: no fp32 upcast, weights in the storage dtype
        _sharded(est, inv, recipe, nproc)
        head_bytes = bytes_per(m.dtype)
    else:
        _replicated(est, inv, recipe, nproc, narrow_bytes)
        head_bytes = narrow_bytes
    head = model.get_output_embeddings()
    head_name = next((n for n, mod in model.named_modules() if mod is head), "lm_head").split(".")[-1]
    head_trains = head_name in recipe.lora.modules_to_save
    if head_trains:
        head_bytes = 4  # the loss runs through the trained fp32 copy
    fused = fused_loss(recipe.train.loss_path, gpu)

    for label, value in activation_parts(recipe, config, linears, quantized_names, fused=fused,
                                         head_bytes=head_bytes, head_trains=head_trains).items():
        est.parts[label] = value
    if recipe.train.method in ("dpo", "kto"):
        # TRL's reference for a PeftModel: a frozen fp32 copy of the starting adapter, never a second base.
        est.parts["reference adapter (frozen copy of the starting adapter)"] = est.trainable_params * 4
        est.notes.append(f"{recipe.train.method}: chosen and rejected (or KL) sequences double each micro-batch; "
                         "the reference is the base with a frozen adapter copy, not a second model")
    if gpu:
        est.parts["runtime overhead (CUDA context, allocator)"] = RUNTIME_OVERHEAD
    if tied:
        est.notes.append("tied input/output embeddings are counted once")
    other = activation_parts(recipe, config, linears, quantized_names, fused=not fused, head_bytes=head_bytes,
                             head_trains=head_trains)
    more = sum(v for k, v in other.items() if k.startswith("loss")) - sum(
        v for k, v in est.parts.items() if k.startswith("loss"))
    if not fused:
        est.fused_saving = -more
    if recipe.train.loss_path == "auto" and fused:  # (an estimate for a GPU, as `qlora estimate` makes)
        est.notes.append(
            "train.loss_path auto: counted with TRL's fused LM head, which training takes on a CUDA GPU; "
            f"without one it takes the plain loss over the full logits, {more / GIB:.2f} GiB more")
    return est


def fused_loss(loss_path: str, gpu: bool) -> bool:
    """train.loss_path resolved: auto is the fused head on a GPU (CUDA), where its Triton kernel runs.
    Training asks it about the machine it runs on (train/trainer.py fused_loss_for), `qlora
    estimate` about the GPU it sizes."""
    return loss_path == "fused" or (loss_path == "auto" and gpu)


LOSS_SAVED = "loss: fp32 log-probabilities (saved)"
LOSS_GRADIENTS = "loss: gradients of the logits (fp32, in backward)"
FUSED_SAVED = "loss: fused LM head, saved (last hidden states)"
FUSED_TILE = "loss: fused LM head's tile (4,096 x 32,768 logits at most)"
FUSED_GRADIENTS = "loss: fused LM head's backward (fp32, hidden states)"
# TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py, TRL 1.16) projects TOKEN_CHUNK_SIZE
# tokens onto _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary entries at a time (trl/trainer/utils.py), into
# one buffer in the compute dtype; tests/test_frozen_dtype.py pins both against the installed TRL.
FUSED_TOKEN_CHUNK = 4096
FUSED_VOCAB_CHUNK = 32768


def activation_parts(recipe, config, linears: dict, quantized_names: set[str], fused: bool = False,
                     head_bytes: int | None = None, head_trains: bool = False) -> dict[str, float]:
    """What one micro-batch of batch_size x max_seq_len tokens adds, the same on every GPU.

    The tensors a Llama-style decoder layer keeps for the backward pass, per token (checked against
    autograd's saved tensors on the CPU by benchmarks/bench_activations.py and tests/test_estimate.py):
      - the residual stream in its dtype r: fp32 in one process or under DDP (the embeddings'
        output is upcast to fp32, and the fp32 norms keep it there: model/load.py attach_lora;
        bitsandbytes returns each 4-bit layer's output in its input's dtype); under
        fsdp/deepspeed there is no upcast. Two sums
        feed the two norms (2 x hidden), and the gated MLP keeps gate, up and act(gate) (3 x intermediate);
      - attention in the compute dtype c: q and the output (2 x hidden), k and v (2 x kv width);
      - each LoRA module keeps its input cast to c (a frozen 4-bit matmul keeps nothing), plus a
        one-byte dropout mask when lora.dropout > 0; attention keeps an fp32 logsumexp per head;
      - per layer, not per token: the c copies autocast makes of the fp32 LoRA factors.
    With gradient checkpointing only each layer's input is kept, plus one layer being recomputed.

    The loss, by path (`fused`; head_bytes: the dtype size lm_head is held in, None for the fp32
    upcast, or the storage dtype under sharding; head_trains: lm_head is in modules_to_save):
      - both: the final norm keeps its input (r);
      - plain: fp32 log-probabilities over the vocabulary for every token and, when lm_head is
        wider than c, the copy of it autocast made for the matmul (when it trains, also its c
        input); backward adds the fp32 gradients of the logits (twice tokens x vocab x 4 bytes);
      - fused (TRL's add_fused_lm_head): the (batch, seq, vocab) logits are never held. Saved for
        backward: the last hidden states it scores (a copy: it gathers the positions with a
        label) and per token the target (int64), log-normalizer and entropy (fp32), the label
        mask; its outputs are per token too. Working: one tile of at most 4,096 tokens x 32,768 vocabulary entries
        in c (the same buffer again in backward), with a c copy of the tile's hidden states and
        of lm_head's rows when they are wider. Backward: the fp32 gradient of the hidden states,
        and an fp32 gradient for all of lm_head when it trains (modules_to_save). Counted for
        every position; the GPU kernel scores only those with a label.
    """
    from qlora_cli.util.dtypes import bytes_per

    t, d, q = recipe.train, recipe.data, recipe.quant
    # DPO and ORPO run prompt + chosen and prompt + rejected as one batch of twice the rows; KTO runs
    # each row with its mismatched KL completion beside it: twice the sequences per micro-batch too.
    tokens = t.batch_size * d.max_seq_len * SEQUENCES_PER_ROW[t.method]
    r = bytes_per(recipe.model.dtype) if recipe.distributed.sharded else 4
    c = bytes_per(q.compute_dtype)
    head_bytes = r if head_bytes is None else head_bytes
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", 4 * hidden)
    heads = config.num_attention_heads
    kv_width = hidden * (getattr(config, "num_key_value_heads", None) or heads) // heads
    first = min((i for i in map(_layer_index, linears) if i is not None), default=None)
    in_layer = [linears[n] for n in _lora_targets(recipe.lora, linears, quantized_names) if _layer_index(n) == first]
    lora_inputs = sum(lin.in_features for lin in in_layer)
    per_token = (2 * r * hidden + 3 * r * inter + c * (2 * hidden + 2 * kv_width) + 4 * heads  # + logsumexp
                 + c * lora_inputs + (lora_inputs if recipe.lora.dropout > 0 else 0))
    # The fp32 LoRA factors are also kept as the compute-dtype copies autocast made of them.
    per_layer = c * recipe.lora.r * sum(lin.in_features + lin.out_features for lin in in_layer) if c < 4 else 0
    parts = {}
    if t.gradient_checkpointing:
        parts["activations (checkpointed)"] = layers * tokens * r * hidden + tokens * per_token + per_layer
    else:
        parts["activations"] = layers * (tokens * per_token + per_layer)
    final_norm_input = tokens * hidden * r  # saved by the final norm, on either path
    if fused:
        rows, columns = min(tokens, FUSED_TOKEN_CHUNK), min(vocab, FUSED_VOCAB_CHUNK)
        # Saved per token: the gathered last hidden state, the target (int64), the log-normalizer
        # and the entropy (fp32), the label mask.
        parts[FUSED_SAVED] = final_norm_input + tokens * (hidden * r + 8 + 4 + 4 + 1)
        # Working: the tile and the casts made for it; per token, the forward's 7 fp32 running
        # statistics and the outputs (log-prob and entropy in fp32, top-1 as bool), also as the
        # copies scattered back to (batch, seq).
        parts[FUSED_TILE] = (rows * columns * c + (rows * hidden * c if r != c else 0)
                             + (columns * hidden * c if head_bytes != c else 0) + tokens * (7 * 4 + 2 * 9))
        parts[FUSED_GRADIENTS] = tokens * hidden * 4 + (vocab * hidden * 4 if head_trains else 0)
        return parts
    lm_head_copy = vocab * hidden * c if head_bytes > c else 0
    head_input = tokens * hidden * c if head_trains and c < 4 else 0  # kept for the head's own gradient
    parts[LOSS_SAVED] = tokens * vocab * 4 + lm_head_copy + final_norm_input + head_input
    parts[LOSS_GRADIENTS] = 2 * tokens * vocab * 4
    # DPO's and KTO's reference pass runs without gradients before the policy's: it keeps nothing for
    # backward, its peak (one layer's tensors and the batch's log-probabilities) is freed before the
    # policy's forward begins, and what it hands over is one fp32 per sequence. So it adds no peak here;
    # the frozen adapter copy it runs through is counted by estimate().
    return parts


SEQUENCES_PER_ROW = {"sft": 1, "dpo": 2, "orpo": 2, "kto": 2}


def _replicated(est: Estimate, inv: _Inventory, recipe, nproc: int, narrow_bytes: int = 4) -> None:
    """One process, or DDP: every GPU holds the whole 4-bit model, adapters and optimizer state.

    narrow_bytes: the size the frozen embeddings and lm_head are held in (4: peft's fp32 upcast)."""
    q, t = recipe.quant, recipe.train
    trainable = est.trainable_params
    est.parts["NF4 weights + quantization constants"] = nf4_bytes(inv.quantized, q.double_quant, inv.matrices)
    if narrow_bytes == 4:
        est.parts["unquantized base weights (fp32)"] = inv.other * 4
    else:
        est.parts[f"unquantized base weights ({recipe.model.dtype}: embeddings, lm_head)"] = inv.narrow * narrow_bytes
        est.parts["unquantized base weights (fp32: norms)"] = (inv.other - inv.narrow) * 4
    est.parts["trainable parameters (fp32)"] = trainable * 4
    est.parts["gradients (fp32)"] = trainable * 4
    est.parts[f"optimizer state ({t.optimizer})"] = trainable * OPTIMIZER_BYTES[t.optimizer]
    if nproc > 1:
        # DDP all-reduces gradients through buckets that hold a second copy of them.
        est.parts["DDP gradient buckets (fp32)"] = trainable * 4
        est.notes.append(f"ddp: each of the {nproc} GPUs holds a whole replica; the figures are per GPU")


def _sharded(est: Estimate, inv: _Inventory, recipe, n: int) -> None:
    """FSDP (full shard) or DeepSpeed ZeRO: each GPU keeps 1/n of what its strategy partitions.

    Weights live in the storage dtype (no fp32 upcast: FSDP flattens one dtype per unit). The 4-bit
    quantization constants are module attributes, not parameters, so every GPU keeps all of them.
    While a unit computes, its full weights are gathered: the root (embeddings, lm_head, final norm)
    for the whole step, and about two decoder layers at a time (the one computing and the prefetched
    next one). For DeepSpeed this is an approximation: it keeps small parameters whole on every GPU
    (stage3_param_persistence_threshold; LoRA factors among them), and gathers the embeddings and
    lm_head only while they compute.
    """
    from qlora_cli.util.dtypes import bytes_per

    q, t, dist = recipe.quant, recipe.train, recipe.distributed
    storage = bytes_per(recipe.model.dtype)
    trainable = est.trainable_params
    if dist.strategy == "fsdp":
        shard_params = shard_grads = shard_optimizer = True
        offload_params = offload_optimizer = dist.fsdp_cpu_offload  # FSDP offloads parameters, grads and the step
        label = "fsdp"
    else:
        from qlora_cli.train.distributed import deepspeed_stage, zero_optimization

        stage = deepspeed_stage(recipe)  # the stage `qlora train` reads, with the same checks
        zero = zero_optimization(recipe)
        shard_params, shard_grads, shard_optimizer = stage >= 3, stage >= 2, stage >= 1
        offload_params = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
        offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
        label = f"ZeRO-{stage}"

    def place(name: str, total: float, sharded: bool, offloaded: bool) -> None:
        if sharded and n > 1:
            name, total = f"{name}, 1/{n} shard", total / n
        (est.offloaded if offloaded else est.parts)[name] = total

    offload_p = offload_params and shard_params
    place("NF4 weights", inv.quantized / 2, shard_params, offload_p)
    est.parts["quantization constants (every GPU)"] = nf4_constants(inv.quantized, q.double_quant, inv.matrices)
    place(f"unquantized base weights ({recipe.model.dtype})", inv.other * storage, shard_params, offload_p)
    place("trainable parameters (fp32)", trainable * 4, shard_params, offload_p)
    place("gradients (fp32)", trainable * 4, shard_grads, offload_optimizer and shard_grads)  # ZeRO-1 keeps them
    place(f"optimizer state ({t.optimizer})", trainable * OPTIMIZER_BYTES[t.optimizer], shard_optimizer,
          offload_optimizer)
    if shard_params and n > 1:  # (one process keeps its weights whole: nothing to gather)
        layer_q, layer_o = inv.largest_layer()
        est.parts["gathered while computing (embeddings, lm_head, 2 decoder layers)"] = (
            inv.outside_layers() * storage + 2 * (layer_q / 2 + layer_o * storage)
        )
    est.notes.append(f"{label}: per GPU with {n} GPU(s); the activations are not sharded")


def _lora_targets(lora, linears: dict, quantized_names: set[str]) -> list[str]:
    """The linear layers LoRA wraps: every 4-bit one for all-linear, else those named."""
    if lora.target_modules == "all-linear":
        return [n for n in linears if f"{n}.weight" in quantized_names]
    return [n for n in linears if n.split(".")[-1] in lora.target_modules]


def _layer_index(name: str) -> int | None:
    """The decoder layer a parameter belongs to ("model.layers.12.mlp..." -> 12), if any."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _trainable_params(recipe, model, linears: dict, quantized_names: set[str]) -> int:
    """LoRA factors on the targeted linear layers, plus full copies of modules_to_save."""
    lora = recipe.lora
    targets = _lora_targets(lora, linears, quantized_names)
    trainable = sum(lora.r * (linears[n].in_features + linears[n].out_features) for n in targets)
    if lora.use_dora:
        trainable += sum(linears[n].out_features for n in targets)
    modules = dict(model.named_modules())
    for wanted in lora.modules_to_save:
        for name, mod in modules.items():
            if name.split(".")[-1] == wanted:
                trainable += sum(p.numel() for p in mod.parameters())
    return trainable


def suggestions(recipe, est: Estimate, nproc: int = 1) -> list[str]:
    """What to change, largest saving first, when the estimate exceeds the budget."""
    t, d, lora = recipe.train, recipe.data, recipe.lora
    out = []
    if nproc > 1 and recipe.distributed.strategy == "ddp":
        out.append(f"distributed.strategy: fsdp (shards the weights, adapters and optimizer state across the {nproc} GPUs)")
    act = sum(v for k, v in est.parts.items() if k.startswith(("activations", "loss")))
    if t.loss_path == "plain" and est.fused_saving > 0:
        out.append(f"train.loss_path: auto (TRL's fused LM head on a CUDA GPU never holds the full logits: "
                   f"about {est.fused_saving / GIB:.1f} GiB less)")
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
