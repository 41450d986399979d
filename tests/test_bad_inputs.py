"""The bad-input corpus: every file in tests/bad_inputs/recipes is a recipe that must be refused.

For each one, `qlora train` must exit 2 with one clear message (the `error:` line) that names
what to fix (the needles in tests/bad_inputs/expected.yaml), print no traceback, and create no
output directory. The recipes point at the tiny model and data through placeholders:
@MODEL@, @DATA@, @HERE@ (tests/bad_inputs) and @OUT@ (a fresh path that must stay absent).

The cases run in-process through the CLI's real entry point (`qlora_cli.cli.main`, argument
parsing and error printing included), so the corpus can grow without a subprocess per case;
tests/test_cli_errors.py also runs some of them through a real subprocess (exit status, stderr).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).parent / "bad_inputs"
EXPECTED = yaml.safe_load((HERE / "expected.yaml").read_text())
CASES = sorted(p.name for p in (HERE / "recipes").iterdir())


def test_corpus_is_large_and_fully_specified():
    assert len(CASES) >= 40
    assert sorted(EXPECTED) == CASES  # every file has expectations, and every expectation a file


@pytest.mark.parametrize("name", CASES)
def test_bad_recipe_is_refused_clearly(name, tiny, tmp_path, qlora_main):
    source = (HERE / "recipes" / name).read_bytes()
    out = tmp_path / "out"
    for key, value in {"@MODEL@": tiny / "model", "@DATA@": tiny / "alpaca.jsonl", "@HERE@": HERE, "@OUT@": out}.items():
        source = source.replace(key.encode(), str(value).encode())
    recipe = tmp_path / name
    recipe.write_bytes(source)

    result = qlora_main("train", recipe)
    code, stderr, stdout = result.returncode, result.stderr, result.stdout
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]
    assert len(re.findall(r"^error: ", stderr, re.MULTILINE)) == 1, stderr  # one message, however many problems
    for needle in EXPECTED[name]:
        assert needle in stderr, f"{needle!r} not in:\n{stderr}"
    assert stdout == ""
    assert not out.exists()


def test_trust_remote_code_is_off_by_default():
    # What a recipe that turns it on may do (nothing without --trust-remote-code): test_run_safety.py.
    from qlora_cli.recipe.schema import Recipe

    assert Recipe.model_fields["model"].annotation.model_fields["trust_remote_code"].default is False


def test_bf16_compute_is_refused_on_a_gpu_without_bf16(monkeypatch):
    """This machine has no GPU, so the GPU is faked: the check must name the key and the fix."""
    import torch

    from qlora_cli.recipe.schema import QuantSection
    from qlora_cli.errors import UserError
    from qlora_cli.train.preflight import check_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(UserError) as exc:
        check_compute_dtype(QuantSection(compute_dtype="bfloat16"))
    assert "quant.compute_dtype" in str(exc.value) and "Tesla T4" in str(exc.value) and "float16" in str(exc.value)
    check_compute_dtype(QuantSection(compute_dtype="float16"))  # the suggested fix passes
