"""Builders map recipe sections to library objects; the loaded model trains through every layer."""

from __future__ import annotations

import pytest
import torch

from qlora_cli.recipe.schema import LoraSection, ModelSection, QuantSection
from qlora_cli.errors import UserError
from qlora_cli.model.load import attach_lora, build_bnb_config, build_lora_config, load_base_model


def test_bnb_config_follows_quant_section():
    cfg = build_bnb_config(QuantSection(quant_type="fp4", double_quant=False, compute_dtype="float16",
                                        storage_dtype="bfloat16"))
    assert cfg.load_in_4bit and not cfg.load_in_8bit
    assert cfg.bnb_4bit_quant_type == "fp4" and cfg.bnb_4bit_use_double_quant is False
    assert cfg.bnb_4bit_compute_dtype == torch.float16 and cfg.bnb_4bit_quant_storage == torch.bfloat16
    default = build_bnb_config(QuantSection())
    assert default.bnb_4bit_quant_type == "nf4" and default.bnb_4bit_use_double_quant
    assert default.bnb_4bit_compute_dtype == torch.bfloat16


def test_lora_config_follows_lora_section():
    cfg = build_lora_config(LoraSection(r=8, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["lm_head"], use_dora=True, use_rslora=True))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"} and cfg.modules_to_save == ["lm_head"]
    assert cfg.use_dora and cfg.use_rslora and cfg.task_type == "CAUSAL_LM"
    assert build_lora_config(LoraSection()).target_modules == "all-linear"


@pytest.fixture()
def base(tiny):
    return load_base_model(ModelSection(name_or_path=str(tiny / "model"), dtype="float32"),
                           QuantSection(compute_dtype="float32"))


def test_model_is_quantized_to_4bit_except_head_and_norms(base):
    import bitsandbytes as bnb

    linear4 = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 14 and not any("lm_head" in n for n in linear4)
    assert base.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"


def test_adapters_go_only_where_asked(base):
    model = attach_lora(base, LoraSection(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                          use_dora=True), gradient_checkpointing=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapted = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert {a.rsplit(".", 2)[-1] for a in adapted} == {"q_proj", "v_proj"}
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    assert any("lm_head.modules_to_save" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)


def test_unknown_target_module_is_a_user_error(base):
    with pytest.raises(UserError) as err:
        attach_lora(base, LoraSection(target_modules=["nonexistent_proj"]), gradient_checkpointing=False)
    assert err.value.problems[0].where == "lora.target_modules"


def _lora_grads(tiny, evaluate_first: bool) -> dict:
    base = load_base_model(ModelSection(name_or_path=str(tiny / "model"), dtype="float32"),
                           QuantSection(compute_dtype="float32"))
    torch.manual_seed(0)
    model = attach_lora(base, LoraSection(r=4, dropout=0.0), gradient_checkpointing=False)
    for name, p in model.named_parameters():  # B starts at zero; give it a value so every path carries gradient
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    ids = torch.tensor([[1, 20, 30, 40, 50, 2]])
    if evaluate_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_an_evaluation_does_not_change_training_gradients(tiny):
    """A no-grad forward (an evaluation) must not change what the next training step computes.

    On AVX512-BF16 CPUs, bitsandbytes repacks weights on the first no-grad forward, and later
    backward passes go through a kernel without autograd: the gradient through the frozen base
    weights is dropped, so early layers get wrong (or no) gradients.
    """
    reference = _lora_grads(tiny, evaluate_first=False)
    after_eval = _lora_grads(tiny, evaluate_first=True)
    assert reference.keys() == after_eval.keys() and len(reference) == 2 * 2 * 7
    for name, grad in reference.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("upcast", [True, False])
def test_sharded_training_keeps_one_frozen_dtype_and_still_trains_the_adapters(tiny, upcast):
    """FSDP flattens each decoder layer into one tensor of one dtype. Under fsdp/deepspeed the
    4-bit weights are stored in bf16 (quant.storage_dtype auto), so the norms must stay bf16 too:
    PEFT's usual fp32 upcast would fail FSDP's wrapping. Gradients must still reach every adapter
    through reentrant gradient checkpointing."""
    base = load_base_model(ModelSection(name_or_path=str(tiny / "model"), dtype="bfloat16"),
                           QuantSection(compute_dtype="bfloat16", storage_dtype="bfloat16"))
    model = attach_lora(base, LoraSection(r=4, dropout=0.0), gradient_checkpointing=True, upcast=upcast)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16, torch.float32} if upcast else {torch.bfloat16})
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    model.train()
    ids = torch.tensor([[1, 20, 30, 40, 50, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
