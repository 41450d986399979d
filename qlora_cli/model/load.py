"""Model-side builders: recipe sections -> bitsandbytes/PEFT/transformers objects.

    bnb = build_bnb_config(recipe.quant)                 # pure, no model needed
    lora = build_lora_config(recipe.lora)                # pure
    tokenizer = load_tokenizer(recipe.model)
    model = load_base_model(recipe.model, recipe.quant)  # 4-bit, on the GPU if there is one
    model = attach_lora(model, recipe.lora, gradient_checkpointing=True)

Loading failures that the user can fix (a missing directory, a hub id that cannot be reached)
become `UserError`s that name the key.
"""

from __future__ import annotations

import torch

from qlora_cli.util.dtypes import torch_dtype
from qlora_cli.errors import UserError, first_line



def device_map() -> dict:
    """Put the whole model on this process's GPU, or on the CPU when there is none.

    bitsandbytes >= 0.50 runs NF4 on the CPU, so the CPU path is real QLoRA, just slow.
    Under a distributed launcher each process takes the GPU of its LOCAL_RANK.
    """
    import os

    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return {"": "cpu"}


def build_bnb_config(quant):
    """The 4-bit quantization settings for `from_pretrained`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage=storage_dtype(quant),
    )


def storage_dtype(quant) -> torch.dtype:
    """The container dtype for packed 4-bit weights. A Recipe resolves "auto" (config.py); a bare
    QuantSection has no strategy to go by, so "auto" is bitsandbytes' default, uint8."""
    return torch_dtype("uint8" if quant.storage_dtype == "auto" else quant.storage_dtype)


def build_lora_config(lora):
    """The PEFT adapter settings."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=list(lora.modules_to_save) or None,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def load_tokenizer(model):
    """Load the tokenizer, with a pad token (EOS when the model has none, as for Llama and Mistral).

    Padding with EOS is safe here because labels are built before padding: pad positions get
    -100 from the collator, while the real EOS at the end of each response keeps its label.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError.single("model.name_or_path", f"could not load the tokenizer: {first_line(exc)}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError.single(
            "model.name_or_path", "needs a fast (Rust) tokenizer to compute loss masks; this model has only a slow one"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model, quant, place: bool = True):
    """Load the base model with its linear layers quantized to 4 bits.

    place=False leaves placement to FSDP/DeepSpeed, which load on the CPU and shard (distributed.py).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_cli.model.architectures import (
        plain_linears,
        quantized_fraction,
        require_4bit,
    )

    try:
        config = AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
        with plain_linears(config.model_type):
            loaded = AutoModelForCausalLM.from_pretrained(
                model.name_or_path,
                revision=model.revision,
                config=config,
                quantization_config=build_bnb_config(quant),
                dtype=torch_dtype(model.dtype),
                device_map=device_map() if place else None,
                trust_remote_code=model.trust_remote_code,
                attn_implementation=model.attn_implementation,
            )
    except (OSError, ValueError) as exc:
        raise UserError.single("model.name_or_path", f"could not load the model: {first_line(exc)}") from None
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        where = "model.attn_implementation" if model.attn_implementation else "model.name_or_path"
        raise UserError.single(where, f"a package the model needs is missing: {first_line(exc)}") from None
    # Checked after loading too (validate and estimate check the same on an empty model first): what
    # is in 4 bits is what transformers did, whatever the architecture.
    require_4bit(quantized_fraction(loaded), "model.name_or_path", torch_dtype(model.dtype).itemsize)
    disable_cpu_weight_repacking(loaded)
    return loaded


def disable_cpu_weight_repacking(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place on AVX512-BF16 CPUs.

    bitsandbytes 0.50 converts a Linear4bit's weight to a CPU-specific packed layout the first
    time it runs without gradients (e.g. an evaluation), and keeps it that way. Later training
    steps then go through `gemv_4bit`, which has no autograd formula: the gradient through the
    frozen base weights is silently dropped, so only the last adapters learn. Turning the
    repacking off keeps the standard layout, which trains correctly, everywhere.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attach_lora(model, lora, gradient_checkpointing: bool, upcast: bool = True):
    """Prepare the quantized model for training and wrap it with fresh LoRA adapters.

    `prepare_model_for_kbit_training` freezes the base, upcasts every unquantized 16-bit layer to
    fp32 and turns on gradient checkpointing. Where training runs under autocast, the frozen
    embeddings and unquantized linear layers (lm_head) then go back to the dtype they were loaded
    in (restore_frozen_dtypes): they train nothing, and autocast casts them to the compute dtype
    for every matmul anyway. The norms stay fp32; the adapters and modules_to_save copies train
    in fp32.

    upcast=False (FSDP, DeepSpeed): the same without the upcast. FSDP flattens each wrapped
    decoder layer into one tensor of one dtype, so its norms must stay in the dtype the 4-bit
    weights are stored in; fp32 norms beside bf16 storage fail with "Must flatten tensors with
    uniform dtype" (TRL#1654, axolotl#1494). The LoRA layers are wrapped on their own (PEFT's
    wrap policy), so they may stay fp32.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from qlora_cli.model.architectures import check_target_modules

    check_target_modules(model, lora)  # PEFT's own message names no module the model has
    check_rank_fits(model, lora)  # before anything is allocated
    loaded = {id(p): p.dtype for p in model.parameters()}  # before peft's upcast
    if upcast:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            # As prepare_model_for_kbit_training does (transformers also makes the embeddings'
            # output require grad, without which reentrant checkpointing gives the adapters none).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        peft_model = get_peft_model(model, build_lora_config(lora))
    except ValueError as exc:  # e.g. a target module name that matches nothing
        raise UserError.single("lora.target_modules", first_line(exc)) from None
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError too
        if not is_out_of_memory(exc):
            raise  # anything else is a bug, with its traceback
        raise UserError.single("lora.r", (
            f"out of memory while creating the adapters ({first_line(exc)}). Each targeted layer gets "
            f"{lora.r} x (its inputs + its outputs) trainable weights: lower lora.r, or list fewer "
            "lora.target_modules; `qlora estimate RECIPE` shows where the memory goes"
        )) from None
    if upcast and frozen_weights_stay_narrow(compute_dtype(model), torch.cuda.is_available()):
        # After get_peft_model: its modules_to_save copies are made from the fp32 upcast and train in fp32.
        restore_frozen_dtypes(peft_model, loaded)
    # PEFT accepts a modules_to_save name that matches nothing and then trains nothing extra.
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    unmatched = [m for m in lora.modules_to_save if not any(f"{m}.modules_to_save." in n for n in trainable)]
    if unmatched:
        raise UserError.single(
            "lora.modules_to_save", f"no module of this model is called {', '.join(map(repr, unmatched))}"
        )
    return peft_model


def frozen_weights_stay_narrow(compute: torch.dtype, cuda: bool) -> bool:
    """Whether training keeps frozen embeddings and unquantized linear layers in the dtype they were
    loaded in, rather than peft's fp32 upcast: when it runs under autocast in 16 bits, as train/run.py
    sets it up (`bf16` for bfloat16 compute; `fp16` for float16 compute, on CUDA only).

    Under autocast every matmul casts its weight to the compute dtype, so an fp32 lm_head computes
    the same bf16 logits as the bf16 one it was upcast from, while holding twice the memory (0.98
    GiB against 0.49 for Mistral-7B's embeddings and head; 3.9 against 1.96 at Llama 3's 128k
    vocabulary), and the embedding lookup returns the same values in either dtype. Without
    autocast (float32 compute, or float16 on the CPU) the matmuls meet fp32 hidden states, so the
    weights must be fp32: everything stays upcast, as before.
    """
    return compute == torch.bfloat16 or (compute == torch.float16 and cuda)


def keeps_loaded_dtype(module) -> bool:
    """The modules whose frozen weights go back to their loaded dtype: embeddings and the linear
    layers left unquantized (lm_head, and e.g. a mixture-of-experts router). Not the norms: they
    hold hidden-size vectors (kilobytes a layer), and in fp32 their output, and so the residual
    stream, stays fp32 as before, where a bf16 norm weight would round each norm's product to bf16."""
    import bitsandbytes as bnb

    if isinstance(module, torch.nn.Embedding):
        return True
    return isinstance(module, torch.nn.Linear) and not isinstance(module, bnb.nn.Linear4bit)


def compute_dtype(model) -> torch.dtype | None:
    """The dtype the model's 4-bit layers compute in (bnb_4bit_compute_dtype), None if it has none."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            return module.compute_dtype
    return None


def restore_frozen_dtypes(model, loaded: dict[int, torch.dtype]) -> None:
    """Put the frozen weights of embeddings and unquantized linear layers back in the 16-bit dtype
    they had before peft's upcast (`loaded`: id(parameter) -> dtype).

    peft's prepare_model_for_kbit_training has no option to leave them out of its upcast (0.21), and
    replicating it would mean following its freeze, input-gradient and checkpointing steps by hand:
    casting back afterwards keeps its code path. A tied output head is the input embedding's
    parameter, restored once. Trainable parameters (LoRA factors, modules_to_save copies, which
    PEFT made from the fp32 upcast) are left fp32, and so are parameters loaded in fp32 (e.g.
    transformers' _keep_in_fp32_modules).
    """
    for module in model.modules():
        if not keeps_loaded_dtype(module):
            continue
        restored = False
        for param in module.parameters(recurse=False):
            dtype = loaded.get(id(param))
            if (not param.requires_grad and dtype in (torch.bfloat16, torch.float16)
                    and param.dtype == torch.float32):
                param.data = param.data.to(dtype)
                restored = True
        if restored and isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(_input_in_weight_dtype)
    embeddings = model.get_input_embeddings()
    if embeddings.weight.dtype != torch.float32:
        # The hidden states start in fp32, as after the upcast (the values are the same: every 16-bit
        # number is exact in fp32). In 16 bits, the first layer's residual sum would be rounded to
        # them, which changes the loss of a bf16 run; the fp32 norms keep it fp32 from there on.
        embeddings.register_forward_hook(_output_in_fp32)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # as peft does after its upcast: hand back the fp32 copies' memory


def _output_in_fp32(module, inputs, output):
    return output.float()


def _input_in_weight_dtype(module, inputs):
    """Outside autocast (a forward training does not run, e.g. a quick check), an fp32 input meets a
    16-bit weight: compute in the weight's dtype, as the model loaded for inference does. Under
    autocast nothing changes: autocast casts both to the compute dtype itself."""
    x = inputs[0] if inputs else None
    if (isinstance(x, torch.Tensor) and x.dtype != module.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        return (x.to(module.weight.dtype), *inputs[1:])
    return None


def check_rank_fits(model, lora) -> None:
    """Refuse a LoRA rank that no targeted layer can use.

    An adapter's update B @ A has rank at most min(in, out) of its layer, so a larger r only adds
    memory: r=100000 fails to allocate, with a traceback. The bound is the widest targeted layer,
    not the narrowest: "all-linear" also targets small layers such as a mixture-of-experts router
    (Mixtral's gate has 8 outputs, Qwen2-MoE's shared_expert_gate 1), and an r above those few is
    harmless, as PEFT allows. The schema caps r (config.py); this is the model's own limit.
    """
    layers = _targeted_linears(model, lora.target_modules)
    if not layers:
        return  # PEFT names the unmatched target modules itself
    name, widest = max(layers, key=lambda item: min(item[1].in_features, item[1].out_features))
    limit = min(widest.in_features, widest.out_features)
    if lora.r > limit:
        raise UserError.single("lora.r", (
            f"is {lora.r}, more than any targeted layer can use: the widest, {name} ({widest.in_features} -> "
            f"{widest.out_features} features), has rank at most {limit}, and a LoRA update cannot exceed its "
            f"layer's rank, so a larger r only adds memory. Set lora.r to at most {limit}"
        ))


def _targeted_linears(model, targets) -> list[tuple[str, torch.nn.Module]]:
    """The linear layers PEFT puts adapters on: for "all-linear", every one but the output head; for a
    list, those whose name is a listed name or ends with "." and one (PEFT's matching rule).
    bitsandbytes' Linear4bit is a torch Linear and keeps the unquantized in/out_features."""
    head = model.get_output_embeddings()
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if targets == "all-linear":
            hit = module is not head
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in targets)
        if hit:
            found.append((name, module))
    return found


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an error is an allocation failure: torch.OutOfMemoryError on a GPU, a RuntimeError
    "DefaultCPUAllocator: can't allocate memory" on the CPU, Python's MemoryError."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text


def keep_adapter_fp32(model) -> None:
    """Hold trainable (adapter) weights in fp32.

    TRL casts them to bf16 for quantized models. Mixed precision still runs the matmuls in the
    compute dtype, but fp32 master weights keep small optimizer updates from rounding away, and
    match what `PeftModel.from_pretrained` loads (it upcasts adapters to fp32), so a reloaded
    adapter reproduces the trained model's logits. The memory cost is small: adapters are ~1%
    of the parameters.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
