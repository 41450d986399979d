"""Which weights are really in 4 bits (issue 26, items 1, 2, 3 and 5): architectures.py.

Models are tiny random ones built from their transformers config classes; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import FalconConfig, LlamaConfig, MixtralConfig

from qlora_cli.model.architectures import MIN_FRACTION, check_vocab_fits, quantized_fraction, require_4bit
from qlora_cli.recipe.schema import ModelSection, QuantSection
from qlora_cli.errors import UserError
from qlora_cli.model.meta import quantized_meta_model

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)


def save(config, folder):
    """A random model of CONFIG saved as a checkpoint, with the tiny tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_falcon_linear_layers_are_quantized(tmp_path, tiny):
    from shutil import copy

    from qlora_cli.model.load import load_base_model

    config = FalconConfig(**SMALL, new_decoder_architecture=False, multi_query=True, bias=False)
    meta = quantized_fraction(quantized_meta_model(config, QuantSection(), torch.float32))
    assert meta.fraction == 1.0 and meta.quantized > 0  # before the fix: 0 weights in 4 bits
    folder = save(config, tmp_path / "falcon")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        copy(tiny / "model" / name, folder / name)
    model = load_base_model(ModelSection(name_or_path=str(folder), dtype="float32"), QuantSection())
    loaded = quantized_fraction(model)
    assert loaded.fraction == 1.0 and loaded.quantized == meta.quantized
    # Built as nn.Linear while loading only: the class itself is left as transformers defines it.
    from transformers.models.falcon import modeling_falcon

    assert modeling_falcon.FalconLinear is not torch.nn.Linear


def test_a_dense_llama_is_entirely_in_4_bits_and_an_moe_model_is_refused_with_the_truth():
    dense = quantized_fraction(quantized_meta_model(
        LlamaConfig(**SMALL, intermediate_size=128, num_key_value_heads=2), QuantSection(), torch.float32))
    assert dense.fraction == 1.0
    require_4bit(dense, "model.name_or_path")  # no error

    moe = quantized_fraction(quantized_meta_model(
        MixtralConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, num_local_experts=4),
        QuantSection(), torch.float32))
    assert moe.fraction < MIN_FRACTION
    assert {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"} <= set(moe.full_precision)
    with pytest.raises(UserError) as err:
        require_4bit(moe, "model.name_or_path", bytes_per_weight=2)
    message = err.value.problems[0].message
    assert err.value.problems[0].where == "model.name_or_path"
    assert f"only {moe.fraction:.1%}" in message and "mlp.experts.gate_up_proj" in message
    assert "bitsandbytes issue 1849" in message and "at 16 bits instead of" in message


def test_training_an_moe_model_stops_before_loading_it_in_16_bits(tmp_path, tiny, write_recipe, qlora_main):
    from shutil import copy

    folder = save(MixtralConfig(**SMALL, intermediate_size=128, num_key_value_heads=2, num_local_experts=4),
                  tmp_path / "mixtral")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        copy(tiny / "model" / name, folder / name)
    recipe = write_recipe({"model": {"name_or_path": str(folder)}})
    result = qlora_main("validate", str(recipe), "--quiet")
    assert result.returncode == 2 and "would be in 4 bits" in result.stderr and "experts" in result.stderr
    assert "Traceback" not in result.stderr
    result = qlora_main("estimate", str(recipe), "--json")
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["quantized_fraction"] < MIN_FRACTION and "bitsandbytes issue 1849" in report["refused"]


def test_the_run_reports_the_share_of_weights_in_4_bits(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["model_memory"]["block_weights_4bit_fraction"] == 1.0
    assert summary["model_memory"]["block_weights"] > 0


def test_a_tokenizer_with_ids_beyond_the_embeddings_is_refused_naming_them(tiny):
    from qlora_cli.model.load import load_tokenizer

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    rows = len(tok)
    check_vocab_fits(tok, rows)  # fits exactly: no error
    tok.add_special_tokens({"pad_token": "<pad>"})  # a pad token the vocabulary lacks
    with pytest.raises(UserError) as err:
        check_vocab_fits(tok, rows)
    message = err.value.problems[0].message
    assert f"'<pad>' ({rows})" in message and f"{rows:,} rows" in message and "resize_token_embeddings" in message
