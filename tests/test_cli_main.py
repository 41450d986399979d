"""Exit codes of the entry point: an internal error is 1 with a traceback, a UserError 2 without."""

from __future__ import annotations

import sys

import pytest

from qlora_cli import cli
from qlora_cli.errors import UserError


def _run_main(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["qlora", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code


def test_internal_error_exits_1_with_traceback(monkeypatch, capsys):
    def boom():
        raise RuntimeError("kaboom")

    monkeypatch.setattr("qlora_cli.recipe.schema.json_schema", boom)
    assert _run_main(monkeypatch, ["schema"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "kaboom" in err and "internal error" in err


def test_user_error_exits_2_without_traceback(monkeypatch, capsys):
    def bad():
        raise UserError.single("lora.r", "must be at least 1", line=3)

    monkeypatch.setattr("qlora_cli.recipe.schema.json_schema", bad)
    assert _run_main(monkeypatch, ["schema"]) == 2
    err = capsys.readouterr().err
    assert "lora.r (line 3): must be at least 1" in err and "Traceback" not in err


def test_ctrl_c_wrapped_by_a_library_is_an_interrupt_not_a_bug(monkeypatch, capsys):
    def wrapped():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:  # e.g. Python's __set_name__ machinery during an import
            raise RuntimeError("Error calling __set_name__") from exc

    monkeypatch.setattr("qlora_cli.recipe.schema.json_schema", wrapped)
    assert _run_main(monkeypatch, ["schema"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_validate_checks_everything_but_trains_nothing(write_recipe, tmp_path, qlora_main):
    proc = qlora_main("validate", str(write_recipe()), "--set", "data.val_size=100", "--set", "data.max_seq_len=64")
    assert proc.returncode == 0, proc.stderr
    # At 64 tokens, the 200 rows with an `input` (the longer Alpaca prompt) have no response
    # token left: they are counted and left out, not trained on as prompt-only rows.
    assert "100 train rows, 100 validation rows, template alpaca" in proc.stderr
    assert "dropped 200 example(s) whose response starts after max_seq_len" in proc.stderr
    assert not (tmp_path / "run").exists()
    # stdout is the fully resolved recipe: overrides applied, defaults written out, and valid itself.
    import yaml

    from qlora_cli.recipe.load import validate_recipe

    resolved = yaml.safe_load(proc.stdout)
    assert resolved["data"]["max_seq_len"] == 64 and resolved["data"]["val_size"] == 100
    assert resolved["quant"]["quant_type"] == "nf4" and "save_total_limit" in resolved["train"]
    validate_recipe(resolved)
