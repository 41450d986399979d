"""A new user's first day (issue 24): what `qlora init` writes for this machine, what a bare
--gpu-memory means, messages that say what to do next, and `qlora estimate` counting tied
embeddings once. Each test failed before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_cli_errors import assert_user_error


# --- 13. estimate: tied embeddings counted once ---------------------------------------------


def _config_only_model(tiny: Path, directory: Path, tie: bool) -> Path:
    """The tiny model's config.json alone (estimate reads nothing else), with or without tying."""
    config = json.loads((tiny / "model" / "config.json").read_text())
    config["tie_word_embeddings"] = tie
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_estimate_counts_tied_embeddings_once(tiny, tmp_path, write_recipe):
    from qlora_cli.estimate import estimate
    from qlora_cli.recipe.load import load_recipe

    config = json.loads((tiny / "model" / "config.json").read_text())
    totals, notes = {}, {}
    for tie in (True, False):
        model = _config_only_model(tiny, tmp_path / f"tie_{tie}", tie)
        recipe = load_recipe(write_recipe({"model": {"name_or_path": str(model)}}, name=f"tie_{tie}.yaml"))
        est = estimate(recipe, gpu=False)
        totals[tie] = est.quantized_params + est.other_params
        notes[tie] = est.notes
    # The untied model has its own lm_head: exactly one vocab x hidden matrix more.
    assert totals[False] - totals[True] == config["vocab_size"] * config["hidden_size"], totals
    assert "tied input/output embeddings are counted once" in notes[True] and not notes[False]


# --- 10. a bare --gpu-memory is GB; --max-shard-size keeps bytes -----------------------------


def test_bare_gpu_memory_is_gb_and_estimate_says_which_budget(write_recipe, qlora_main):
    from qlora_cli.merge.weights import parse_size

    assert parse_size("24", "--gpu-memory", bare="GB") == 24 * 10**9
    assert parse_size("24GiB", "--gpu-memory", bare="GB") == 24 * 2**30
    assert parse_size("500") == 500  # --max-shard-size: a bare number stays bytes, as in transformers
    recipe = write_recipe()
    bare = qlora_main("estimate", recipe, "--gpu-memory", "24")
    assert bare.returncode == 0, bare.stderr
    assert "budget: 22.4 GiB, from --gpu-memory 24, read as 24 GB" in bare.stdout, bare.stdout
    assert "fits in 22.4 GiB" in bare.stdout and "does not fit" not in bare.stdout
    unit = qlora_main("estimate", recipe, "--gpu-memory", "50MB")
    assert "budget: 0.0 GiB, from --gpu-memory 50MB\n" in unit.stdout and "does not fit" in unit.stdout
    data = json.loads(qlora_main("estimate", recipe, "--gpu-memory", "24", "--json").stdout)
    assert data["budget_bytes"] == 24 * 10**9 and data["fits"] is True
    for command in ("estimate", "merge"):
        assert "a bare number is" in " ".join(qlora_main(command, "--help").stdout.split())


# --- 8. `qlora init` writes a recipe for this machine; a sharegpt starter --------------------


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_init_suits_the_machine_and_every_starter_validates(gpu, tmp_path, qlora_main, monkeypatch):
    import torch

    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.recipe.starter import FORMATS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert "sharegpt" in FORMATS
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.yaml"
        result = qlora_main("init", "--model", "my/model", "--format", fmt, "--output", out)
        assert result.returncode == 0, result.stderr
        recipe = load_recipe(out)  # valid as written
        assert recipe.data.sources[0].format == fmt
        dtype, optimizer = ("bfloat16", "paged_adamw_8bit") if gpu else ("float32", "adamw_torch")
        assert (recipe.model.dtype, recipe.quant.compute_dtype, recipe.train.optimizer) == (dtype, dtype, optimizer)
        # A comment says what to write on the other kind of machine.
        text = out.read_text()
        other = "on a CPU-only machine use adamw_torch" if gpu else "on a GPU use paged_adamw_8bit"
        assert other in text and ("float32 on a CPU-only machine" if gpu else "on a GPU use bfloat16") in text
    assert ("this GPU" if gpu else "a machine without a GPU") in result.stderr
    sharegpt = load_recipe(tmp_path / "sharegpt.yaml")
    assert sharegpt.data.template == "chatml" and '"from": "human"' in (tmp_path / "sharegpt.yaml").read_text()
