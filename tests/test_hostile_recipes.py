"""Hostile or absurd recipes (issue 23): YAML alias bombs, booleans where numbers belong, and numbers
far outside anything a run can use. Each ends in a message that names the file and line, the key,
or the --set item, and says what to do: exit 2, no traceback, no half-made run directory. The small
legitimate forms (a reused anchor, `learning_rate: 1`, `--set train.learning_rate=2e-4`) keep working."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from qlora_cli import config
from qlora_cli.config import load_recipe
from qlora_cli.errors import UserError

# The smallest valid recipe (as in test_config.py): text appended to it starts at line 7.
BASE = """\
model:
  name_or_path: org/some-model
data:
  sources:
    - path: data.jsonl
      format: alpaca
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def only_problem(err: UserError):
    assert len(err.problems) == 1, err.render()
    return err.problems[0]


def assert_user_error(result, *needles: str) -> None:
    """Exit 2 with a plain message naming what to fix, and no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in stderr:\n{result.stderr[-3000:]}"


# ---------------------------------------------------------------------------------------------
# YAML alias bombs


def bomb_levels(levels: int, width: int = 10) -> list[str]:
    """Flow lists of nested anchors ("billion laughs"): level k holds `width` aliases of level k-1,
    so the last anchor expands to width**levels leaves while the text stays `levels` short lines."""
    rows = [f"&l0 [{', '.join(['lol'] * width)}]"]
    rows += [f"&l{k} [{', '.join([f'*l{k - 1}'] * width)}]" for k in range(1, levels)]
    return rows


def test_alias_bomb_in_a_recipe_is_refused_at_its_line_before_it_expands(tmp_path, qlora_main):
    # 10^9 leaves: the old loader walked every one of them (MemoryError, with a traceback).
    rows = bomb_levels(9)
    path = write(tmp_path, BASE + "x-anchors:\n" + "".join(f"  - {row}\n" for row in rows))
    bomb_lines = range(8, 8 + len(rows))  # x-anchors: is line 7

    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert time.perf_counter() - started < 2  # refused while composing: milliseconds, not minutes
    problem = only_problem(err.value)
    where, _, line = problem.where.rpartition(":")
    assert where == str(path) and int(line) in bomb_lines, problem.where
    assert f"more than {config.MAX_ALIAS_EXPANSION:,}" in problem.message and "alias" in problem.message

    result = qlora_main("validate", str(path))
    assert_user_error(result, f"{path}:{line}", "alias")


def test_alias_bomb_in_a_set_value_is_refused_naming_the_item(tmp_path, qlora_main):
    # Values of --set are YAML too: the old code built a 10^9-leaf list and handed it to pydantic.
    path = write(tmp_path, BASE)
    item = f"lora.target_modules=[{', '.join(bomb_levels(9))}]"
    started = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_recipe(path, [item])
    assert time.perf_counter() - started < 2
    problem = only_problem(err.value)
    assert problem.where == f"--set {item}" and "alias" in problem.message

    assert_user_error(qlora_main("validate", str(path), "--set", item), "--set lora.target_modules=[&l0", "alias")


def test_aliases_may_expand_up_to_the_bound_and_no_further(tmp_path, monkeypatch):
    # Each use of *cols adds 3 values (the mapping, one key, one value).
    monkeypatch.setattr(config, "MAX_ALIAS_EXPANSION", 6)
    text = BASE.replace("      format: alpaca\n", "      format: alpaca\n      columns: &cols {instruction: q}\n") + (
        "  val_sources:\n"
        "    - {path: v1.jsonl, format: alpaca, columns: *cols}\n"  # line 9
        "    - {path: v2.jsonl, format: alpaca, columns: *cols}\n"  # line 10: 6 values from aliases, the bound
    )
    recipe = load_recipe(write(tmp_path, text))
    assert [s.columns for s in recipe.data.val_sources] == [{"instruction": "q"}] * 2

    path = write(tmp_path, text + "    - {path: v3.jsonl, format: alpaca, columns: *cols}\n")  # line 11: 9 > 6
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert only_problem(err.value).where == f"{path}:11"


def test_a_reused_anchor_is_a_copy_so_set_changes_only_the_key_it_names(tmp_path):
    # YAML aliases share one object; `--set` on one key path used to change every place the anchor
    # was reused (here the training source's columns too).
    path = write(tmp_path, """\
        model:
          name_or_path: org/some-model
        data:
          sources:
            - path: a.jsonl
              format: alpaca
              columns: &cols {instruction: question, output: answer}
          val_sources:
            - path: b.jsonl
              format: alpaca
              columns: *cols
        """)
    recipe = load_recipe(path, ["data.val_sources[0].columns.output=reply"])
    assert recipe.data.val_sources[0].columns == {"instruction": "question", "output": "reply"}
    assert recipe.data.sources[0].columns == {"instruction": "question", "output": "answer"}


def test_a_recursive_alias_is_named_with_its_line(tmp_path):
    path = write(tmp_path, BASE + "x-loop: &loop [a, *loop]\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    problem = only_problem(err.value)
    assert problem.where == f"{path}:7"
    assert "*loop" in problem.message and "refers to itself" in problem.message


def test_deep_nesting_is_not_called_a_recursive_alias(tmp_path):
    path = write(tmp_path, BASE + "x-deep: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    problem = only_problem(err.value)
    assert problem.where == str(path)
    assert "nested too deeply" in problem.message and "alias" not in problem.message
