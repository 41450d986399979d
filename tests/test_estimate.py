"""`qlora estimate`: the weight part against a real 4-bit load, the trainable count against PEFT's,
and the verdict with what to change."""

from __future__ import annotations

import json

import yaml

from conftest import tiny_recipe


def test_weights_and_trainable_count_match_a_real_load(tiny, tmp_path):
    from qlora_cli.config import validate_recipe
    from qlora_cli.estimate import estimate
    from qlora_cli.modeling import attach_lora, load_base_model

    recipe = validate_recipe(tiny_recipe(tiny, tmp_path / "run"))  # modules_to_save: embed_tokens, lm_head
    est = estimate(recipe, gpu=False)
    peft_model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=False)
    assert est.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base = peft_model.get_base_model()
    trained = sum(p.numel() * p.element_size() for n, p in base.named_parameters()
                  if "lora_" in n or "modules_to_save" in n)
    measured = base.get_memory_footprint() - trained
    assert abs(est.weights / measured - 1) < 0.05, (est.weights, measured)
    assert est.quantized_params > 0 and est.other_params > 0


def test_verdict_and_suggestions(tiny, tmp_path, qlora_main):
    raw = tiny_recipe(tiny, tmp_path / "run")
    raw["train"]["batch_size"] = 64
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    small = qlora_main("estimate", path, "--gpu-memory", "50MB")
    assert small.returncode == 0, small.stderr
    assert "does not fit" in small.stdout and "train.gradient_checkpointing: true" in small.stdout
    assert "train.batch_size: 32" in small.stdout
    big = qlora_main("estimate", path, "--gpu-memory", "8GB", "--json")
    data = json.loads(big.stdout)
    assert data["fits"] is True and data["total_bytes"] == sum(data["parts_bytes"].values())
    # Checkpointing and a smaller batch lower the estimate.
    lower = qlora_main("estimate", path, "--json", "--set", "train.gradient_checkpointing=true",
                       "--set", "train.batch_size=8")
    assert json.loads(lower.stdout)["total_bytes"] < data["total_bytes"]
    for size in ("lots", "0"):
        bad = qlora_main("estimate", path, "--gpu-memory", size)
        assert bad.returncode == 2 and "--gpu-memory" in bad.stderr and "Traceback" not in bad.stderr
