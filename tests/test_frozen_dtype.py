"""Frozen unquantized weights in the recipe's dtype (issue 27): attach_lora puts the embeddings and
lm_head back in bf16 after peft's fp32 upcast, keeps norms, adapters and modules_to_save copies in
fp32, and trains to the same losses as the upcast model; `qlora estimate` counts what that holds
and follows train.loss_path, for Mistral-7B's and Llama-3-8B's published shapes."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_cli.recipe.schema import LoraSection, ModelSection, QuantSection
from qlora_cli.model.load import attach_lora, build_lora_config, load_base_model

GIB = 2**30


def _base(tiny, dtype: str, compute: str | None = None, path=None):
    return load_base_model(ModelSection(name_or_path=str(path or tiny / "model"), dtype=dtype),
                           QuantSection(compute_dtype=compute or dtype))


def _upcast_plainly(base, lora: LoraSection, gradient_checkpointing: bool = True):
    """The path before issue 27: peft's prepare_model_for_kbit_training (every 16-bit layer to fp32)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    prepared = prepare_model_for_kbit_training(base, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(prepared, build_lora_config(lora))


def _dtypes(model) -> dict[str, tuple[torch.dtype, bool]]:
    return {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()
            if p.__class__.__name__ != "Params4bit"}


def test_bf16_recipe_keeps_frozen_embeddings_and_head_in_bf16(tiny):
    model = attach_lora(_base(tiny, "bfloat16"), LoraSection(r=4, modules_to_save=["lm_head"]),
                        gradient_checkpointing=True)
    params = _dtypes(model)
    embed = params["base_model.model.model.embed_tokens.weight"]
    head = params["base_model.model.lm_head.original_module.weight"]
    copy = params["base_model.model.lm_head.modules_to_save.default.weight"]
    assert embed == (torch.bfloat16, False) and head == (torch.bfloat16, False)
    assert copy == (torch.float32, True)  # the trained copy of lm_head, made from the fp32 upcast
    adapters = {n: v for n, v in params.items() if ".lora_" in n}
    assert adapters and set(adapters.values()) == {(torch.float32, True)}
    norms = {n: v for n, v in params.items() if "norm" in n}
    assert len(norms) == 2 * 2 + 1 and set(norms.values()) == {(torch.float32, False)}
    # Everything but the 4-bit weights is accounted for: frozen bf16 embeddings/head, fp32 the rest.
    assert set(params) == {*adapters, *norms, "base_model.model.model.embed_tokens.weight",
                           "base_model.model.lm_head.original_module.weight",
                           "base_model.model.lm_head.modules_to_save.default.weight"}


def test_bf16_frozen_weights_hold_half_the_upcast_bytes(tiny):
    from qlora_cli.model.footprint import measured_4bit_bytes

    lora = LoraSection(r=4)
    new = attach_lora(_base(tiny, "bfloat16"), lora, gradient_checkpointing=False)
    old = _upcast_plainly(_base(tiny, "bfloat16"), lora, gradient_checkpointing=False)
    config = new.get_base_model().config
    embeddings_and_head = 2 * config.vocab_size * config.hidden_size
    # Two bytes less for each of them, and nothing else changed.
    assert measured_4bit_bytes(old) - measured_4bit_bytes(new) == 2 * embeddings_and_head


@pytest.mark.parametrize("dtype, compute", [("float32", "float32"), ("bfloat16", "float32")])
def test_without_16_bit_autocast_every_dtype_is_as_peft_leaves_it(tiny, dtype, compute):
    # fp32 compute runs no autocast: the head must meet the fp32 hidden states in fp32, so the
    # upcast stays (and an fp32 recipe has nothing to upcast). Same dtypes as the plain peft path.
    lora = LoraSection(r=4, modules_to_save=["lm_head"])
    new = attach_lora(_base(tiny, dtype, compute), lora, gradient_checkpointing=True)
    old = _upcast_plainly(_base(tiny, dtype, compute), lora)
    assert _dtypes(new) == _dtypes(old)
    assert {d for d, _ in _dtypes(new).values()} == {torch.float32}


def test_tied_embeddings_stay_one_bf16_tensor(tiny, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny / "model")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "tied")
    model = attach_lora(_base(tiny, "bfloat16", path=tmp_path / "tied"), LoraSection(r=4, dropout=0.0),
                        gradient_checkpointing=True)
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert base.lm_head.weight.dtype == torch.bfloat16 and not base.lm_head.weight.requires_grad
    ids = torch.tensor([[1, 20, 30, 40, 50, 2]])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _losses(tiny, dtype: str, new: bool, fused: bool, modules_to_save=(), steps: int = 4) -> list[float]:
    """A few AdamW steps of the tiny model, as training runs them: gradient checkpointing, autocast
    in the compute dtype (none for fp32), the plain loss or TRL's fused LM head."""
    lora = LoraSection(r=4, dropout=0.0, modules_to_save=list(modules_to_save))
    base = _base(tiny, dtype)
    torch.manual_seed(0)
    model = attach_lora(base, lora, gradient_checkpointing=True) if new else _upcast_plainly(base, lora)
    if fused:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    kind = getattr(torch, dtype)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=kind, enabled=kind != torch.float32):
            loss = model(input_ids=ids, labels=ids, **({"fused_lm_head": True} if fused else {})).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


BF16_TOLERANCE = 1e-6  # relative, per step; measured: 0 (the same losses bit for bit on this CPU)


@pytest.mark.parametrize("dtype, fused, modules_to_save", [
    ("float32", False, ()),
    ("bfloat16", False, ()),
    ("bfloat16", True, ()),
    ("bfloat16", False, ("lm_head",)),
])
def test_training_losses_match_the_fp32_upcast(tiny, dtype, fused, modules_to_save):
    """The upcast path (peft alone) against attach_lora's, step by step. In fp32 nothing changes, so
    the losses are equal. In bf16 autocast casts the weights for every matmul, so a bf16 head gives
    the bf16 products its fp32 upcast gave; the embeddings' output goes back to fp32 so that the
    first layer's residual sum is not rounded to bf16 (without that: 2e-3 to 1.2e-2 apart after 5
    steps). BF16_TOLERANCE is the bound asserted."""
    old = _losses(tiny, dtype, new=False, fused=fused, modules_to_save=modules_to_save)
    new = _losses(tiny, dtype, new=True, fused=fused, modules_to_save=modules_to_save)
    assert new[-1] < new[0] - 0.5  # it trains
    if dtype == "float32":
        assert new == old
    else:
        for a, b in zip(old, new):
            assert abs(a - b) <= BF16_TOLERANCE * abs(a), (old, new)


def test_fused_head_constants_are_trls():
    """The estimate counts the fused head's tile from TRL's chunk sizes: pinned to the installed TRL."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    from qlora_cli.estimate import FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK

    assert (FUSED_TOKEN_CHUNK, FUSED_VOCAB_CHUNK) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


# ---------------------------------------------------------------------------------------------
# `qlora estimate` on published shapes (config.json only, written from benchmarks/bench_estimate.py)


def _public(name: str, tmp_path, quant: dict | None = None, lora: dict | None = None, **train):
    import bench_estimate  # benchmarks/ is on the path (conftest)

    from qlora_cli.recipe.load import validate_recipe

    model_dir = bench_estimate.write_public_config(name, tmp_path / name)
    raw = bench_estimate.public_recipe(model_dir, **train)
    raw["quant"].update(quant or {})
    raw["lora"].update(lora or {})
    return validate_recipe(raw)


@pytest.mark.parametrize("name, vocab", [("Mistral-7B-v0.1", 32000), ("Meta-Llama-3-8B", 128256)])
def test_estimate_counts_bf16_embeddings_and_head(tmp_path, name, vocab):
    from qlora_cli.estimate import estimate

    est = estimate(_public(name, tmp_path))
    head_and_embeddings = 2 * vocab * 4096
    assert est.parts["unquantized base weights (bfloat16: embeddings, lm_head)"] == 2 * head_and_embeddings
    assert est.parts["unquantized base weights (fp32: norms)"] == (2 * 32 + 1) * 4096 * 4
    assert "unquantized base weights (fp32)" not in est.parts
    # Mistral-7B: 0.49 GiB (0.98 upcast); Llama 3's 128k vocabulary: 1.96 GiB (3.9 upcast)
    assert round(2 * head_and_embeddings / GIB, 2) == {32000: 0.49, 128256: 1.96}[vocab]


def test_estimate_keeps_the_upcast_where_training_does(tmp_path):
    from qlora_cli.estimate import estimate

    recipe = _public("Mistral-7B-v0.1", tmp_path, quant={"compute_dtype": "float32"})
    est = estimate(recipe)  # no autocast: training keeps everything fp32
    assert est.parts["unquantized base weights (fp32)"] == (2 * 32000 * 4096 + 65 * 4096) * 4
    recipe = _public("Mistral-7B-v0.1", tmp_path, quant={"compute_dtype": "float16"})  # autocast on a GPU only
    assert "unquantized base weights (bfloat16: embeddings, lm_head)" in estimate(recipe).parts
    assert "unquantized base weights (fp32)" in estimate(recipe, gpu=False).parts


@pytest.mark.parametrize("name, vocab", [("Mistral-7B-v0.1", 32000), ("Meta-Llama-3-8B", 128256)])
def test_estimate_follows_the_loss_path(tmp_path, name, vocab):
    from qlora_cli.estimate import FUSED_GRADIENTS, FUSED_SAVED, FUSED_TILE, LOSS_GRADIENTS, LOSS_SAVED, estimate

    def loss(est):
        return {k: v for k, v in est.parts.items() if k.startswith("loss")}

    tokens, hidden = 4 * 1024, 4096  # the shipped Mistral recipe: batch 4 x 1,024
    auto = estimate(_public(name, tmp_path))  # for a GPU, as `qlora estimate` does
    fused = estimate(_public(name, tmp_path, loss_path="fused"))
    plain = estimate(_public(name, tmp_path, loss_path="plain"))
    cpu = estimate(_public(name, tmp_path), gpu=False)
    assert loss(auto) == loss(fused) and set(loss(fused)) == {FUSED_SAVED, FUSED_TILE, FUSED_GRADIENTS}
    assert loss(cpu) == loss(plain) and set(loss(plain)) == {LOSS_SAVED, LOSS_GRADIENTS}
    # Plain: the (batch, seq, vocab) log-probabilities in fp32, saved, and twice that in backward
    # (with the final norm's fp32 input); the bf16 head needs no bf16 copy for autocast any more.
    assert plain.parts[LOSS_SAVED] == tokens * vocab * 4 + tokens * hidden * 4
    assert plain.parts[LOSS_GRADIENTS] == 2 * tokens * vocab * 4
    # Fused: never a (tokens, vocab) tensor; one bf16 tile of 4,096 x min(vocab, 32,768) with the
    # bf16 copy of its 4,096 hidden states (and 46 bytes a token of running statistics and outputs);
    # saved: the final norm's input, the hidden states it scores (fp32) and 17 bytes a token; the
    # fp32 gradient of the hidden states.
    assert fused.parts[FUSED_TILE] == 4096 * min(vocab, 32768) * 2 + 4096 * hidden * 2 + tokens * 46
    assert fused.parts[FUSED_SAVED] == tokens * (2 * hidden * 4 + 17)
    assert fused.parts[FUSED_GRADIENTS] == tokens * hidden * 4
    saved = sum(loss(plain).values()) - sum(loss(fused).values())
    assert saved > {32000: 1.0, 128256: 5.0}[vocab] * GIB  # GiB: the fused head's worth at this vocabulary
    assert any("auto: counted with TRL's fused LM head" in n for n in auto.notes)
    assert not any("loss_path" in n for n in plain.notes + cpu.notes)


def test_fused_head_saves_what_the_estimate_counts():
    """On the CPU (TRL's torch fallback of the same kernel): what the fused head and the final norm
    save for backward, counted by autograd's saved-tensor hooks, against the estimate's part."""
    import bench_activations  # benchmarks/ is on the path (conftest)

    from qlora_cli.estimate import FUSED_SAVED, estimate
    from qlora_cli.model.footprint import _quant_state_tensors, _quantized
    from trl.trainer.utils import add_fused_lm_head

    shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4000)
    recipe, model = bench_activations.load(batch=2, seq=64, dtype_name="bfloat16", shape=shape)
    predicted = estimate(recipe, gpu=True).parts[FUSED_SAVED]  # auto on a GPU: the fused head
    add_fused_lm_head(model.get_base_model())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {t.untyped_storage().data_ptr() for p in _quantized(model) for t in _quant_state_tensors(p.quant_state)}
    counter = bench_activations.SavedBytes(weights)
    model.get_base_model().model.norm.register_forward_pre_hook(lambda *_: setattr(counter, "active", True))
    ids = torch.randint(0, shape["vocab_size"], (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    measured = counter.take()
    loss.backward()
    assert abs(predicted / measured - 1) < 0.05, (predicted, measured)


def test_fused_head_with_a_trained_lm_head_counts_its_fp32_gradient(tmp_path):
    from qlora_cli.estimate import FUSED_GRADIENTS, FUSED_TILE, estimate

    est = estimate(_public("Mistral-7B-v0.1", tmp_path, lora={"modules_to_save": ["lm_head"]}))
    tokens, hidden, vocab = 4 * 1024, 4096, 32000
    assert est.parts[FUSED_GRADIENTS] == tokens * hidden * 4 + vocab * hidden * 4
    # The fp32 copy is cast to bf16 a tile's rows at a time.
    assert est.parts[FUSED_TILE] == 4096 * vocab * 2 + 4096 * hidden * 2 + vocab * hidden * 2 + tokens * 46


def test_cli_estimate_says_which_loss_path_it_counted(tmp_path, qlora_main):
    import bench_estimate
    import yaml

    model_dir = bench_estimate.write_public_config("Meta-Llama-3-8B", tmp_path / "llama3")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(bench_estimate.public_recipe(model_dir)))
    out = qlora_main("estimate", path, "--gpu-memory", "24GB")
    assert out.returncode == 0, out.stderr
    assert "fused LM head" in out.stdout and "train.loss_path auto" in out.stdout
    data = json.loads(qlora_main("estimate", path, "--json", "--set", "train.loss_path=plain").stdout)
    assert "loss: fp32 log-probabilities (saved)" in data["parts_bytes"]


def test_plain_loss_path_suggests_the_fused_head_when_it_does_not_fit(tmp_path):
    from qlora_cli.estimate import estimate, suggestions

    plain = estimate(_public("Meta-Llama-3-8B", tmp_path, loss_path="plain"))
    auto = estimate(_public("Meta-Llama-3-8B", tmp_path))
    assert abs(plain.fused_saving - (plain.total - auto.total)) < 1  # bytes
    line = next(s for s in suggestions(_public("Meta-Llama-3-8B", tmp_path, loss_path="plain"), plain)
                if s.startswith("train.loss_path"))
    assert f"about {(plain.total - auto.total) / GIB:.1f} GiB less" in line
    assert not any(s.startswith("train.loss_path") for s in suggestions(_public("Meta-Llama-3-8B", tmp_path), auto))
