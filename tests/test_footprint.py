"""qlora_cli.model.footprint: the bytes a 4-bit model really holds against the NF4 + double-quant theory.

Models are loaded in 4 bits on the CPU exactly as training loads them (transformers +
bitsandbytes); the tiny session model and a small Llama with 256-wide layers (big enough for
double quantization to pay for its lookup tables) are both built locally in a few seconds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qlora_cli.model.footprint import (
    bits_per_quantized_param,
    footprint,
    measured_4bit_bytes,
    quant_state_bytes,
    theoretical_4bit_bytes,
)

QLORA_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: the QLoRA paper's figure
PLAIN_BITS = 4 + 32 / 64  # 4.5: fp32 absmax per 64-weight block


def load_4bit(model_dir, double_quant: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.float32,
                                                device_map={"": "cpu"})


@pytest.fixture(scope="module")
def tiny_models(tiny):
    return {dq: load_4bit(tiny / "model", dq) for dq in (True, False)}


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory):
    """One layer with 256 x 256 attention matrices (65k weights each): there, double quantization's
    1 KiB lookup table per matrix costs less than the 0.37 bits per weight it saves."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("wide")
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return {dq: load_4bit(out, dq) for dq in (True, False)}


@pytest.mark.parametrize("double_quant", [True, False])
def test_measured_is_within_3_percent_of_theory_on_the_tiny_model(tiny_models, double_quant):
    result = footprint(tiny_models[double_quant])
    assert result["measured_bytes"] == measured_4bit_bytes(tiny_models[double_quant])
    assert result["ratio"] == pytest.approx(1.0, abs=0.03)
    assert result["double_quant"] is double_quant
    assert result["quantized_params"] == 2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 128)  # 2 layers, GQA k/v


def test_measured_is_get_memory_footprint_plus_the_quant_states(tiny_models):
    # transformers counts parameters (a 4-bit weight as its packed uint8 bytes) and buffers only
    model = tiny_models[True]
    assert quant_state_bytes(model) > 0
    assert measured_4bit_bytes(model) == model.get_memory_footprint() + quant_state_bytes(model)


def test_bits_per_weight_are_the_qlora_figures(tiny_models, wide_models):
    # The formula gives the papers' numbers exactly; the real tensors round the nested absmax up to
    # whole groups of 256 blocks, which a 4k-weight matrix (64 blocks) feels: tolerance 0.01 bit.
    for models in (tiny_models, wide_models):
        assert bits_per_quantized_param(models[True], measured=False) == pytest.approx(QLORA_BITS, abs=1e-9)
        assert bits_per_quantized_param(models[True]) == pytest.approx(QLORA_BITS, abs=0.01)
        assert bits_per_quantized_param(models[False], measured=False) == pytest.approx(PLAIN_BITS, abs=1e-9)
        assert bits_per_quantized_param(models[False]) == pytest.approx(PLAIN_BITS, abs=1e-9)
    assert bits_per_quantized_param(wide_models[True]) == pytest.approx(QLORA_BITS, abs=1e-3)


def test_switching_double_quant_off_costs_bytes_on_real_sized_matrices(wide_models):
    with_dq, without = wide_models[True], wide_models[False]
    assert theoretical_4bit_bytes(with_dq, double_quant=False) > theoretical_4bit_bytes(with_dq)
    # pricing the double-quantized model without it predicts what the plain load really holds
    assert theoretical_4bit_bytes(with_dq, double_quant=False) == measured_4bit_bytes(without)
    assert theoretical_4bit_bytes(without, double_quant=True) == theoretical_4bit_bytes(with_dq)
    assert measured_4bit_bytes(without) > measured_4bit_bytes(with_dq)
    assert footprint(with_dq)["ratio"] == pytest.approx(1.0, abs=0.001)


def test_on_toy_matrices_double_quant_tables_outweigh_its_savings(tiny_models):
    # 14 matrices of 4k-8k weights: the 1 KiB dynamic map + offset per matrix is more than
    # 0.37 bits x 73,728 weights saves. Theory and measurement agree on that direction.
    with_dq, without = tiny_models[True], tiny_models[False]
    saved = 73_728 * (PLAIN_BITS - QLORA_BITS) / 8
    tables = 14 * (256 * 4 + 4)
    assert theoretical_4bit_bytes(with_dq) - theoretical_4bit_bytes(with_dq, double_quant=False) == pytest.approx(
        tables - saved, abs=1)
    assert measured_4bit_bytes(with_dq) > measured_4bit_bytes(without)


def test_a_peft_model_counts_its_adapters_at_their_dtype(tiny_models):
    from peft import LoraConfig, get_peft_model

    base = tiny_models[True]
    before = footprint(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear"))
    try:
        adapters = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
        after = footprint(peft_model)
        assert after["quantized_params"] == before["quantized_params"]
        assert after["measured_bytes"] == before["measured_bytes"] + adapters
        assert after["theoretical_bytes"] == before["theoretical_bytes"] + adapters
    finally:
        peft_model.unload()  # leave the module-scoped base model as it was


@pytest.mark.slow  # a fresh interpreter
def test_importing_the_module_loads_no_heavy_library():
    code = ("import sys, qlora_cli.model.footprint; "
            "print(sorted(m for m in ('transformers', 'bitsandbytes', 'peft', 'trl', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
