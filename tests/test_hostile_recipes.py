"""Hostile or absurd recipes (issue 23): YAML alias bombs, booleans where numbers belong, and numbers
far outside anything a run can use. Each ends in a message that names the file and line, the key,
or the --set item, and says what to do: exit 2, no traceback, no half-made run directory. The small
legitimate forms (a reused anchor, `learning_rate: 1`, `--set train.learning_rate=2e-4`) keep working."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
import torch

from qlora_cli.recipe.load import MAX_ALIAS_EXPANSION
from qlora_cli.recipe.schema import LoraSection, ModelSection, QuantSection, Recipe
from qlora_cli.recipe.load import _section_type, load_recipe
from qlora_cli.errors import UserError

from test_config import BASE  # the smallest valid recipe: text appended to it starts at line 7


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
    assert f"more than {MAX_ALIAS_EXPANSION:,}" in problem.message and "alias" in problem.message

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
    monkeypatch.setattr("qlora_cli.recipe.load.MAX_ALIAS_EXPANSION", 6)
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


def test_a_merge_key_may_be_overridden_and_its_values_are_copies(tmp_path):
    # `<<: *src` then `path:` overrides a merged key; that is not a key written twice.
    path = write(tmp_path, """\
        model:
          name_or_path: org/some-model
        data:
          sources:
            - &src {path: a.jsonl, format: alpaca, columns: {instruction: q}}
          val_sources:
            - <<: *src
              path: b.jsonl
        """)
    recipe = load_recipe(path, ["data.val_sources[0].columns.instruction=question"])
    assert (recipe.data.val_sources[0].path, recipe.data.val_sources[0].columns) == ("b.jsonl", {"instruction": "question"})
    assert (recipe.data.sources[0].path, recipe.data.sources[0].columns) == ("a.jsonl", {"instruction": "q"})


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


# ---------------------------------------------------------------------------------------------
# Booleans are not numbers


def numeric_keys() -> list[str]:
    """Every int or float key of the schema, as a --set key (lists of sections at index 0)."""
    keys = []

    def walk(model, prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _section_type(field.annotation)
            if sub is not None:
                if name != "val_sources":  # the same class as sources
                    walk(sub, f"{prefix}{name}[0]." if "list" in str(field.annotation) else f"{prefix}{name}.")
                continue
            annotation = field.annotation
            args = getattr(annotation, "__args__", None) or (annotation,)
            if int in args or float in args:
                keys.append(prefix + name)

    walk(Recipe, "")
    return keys


def test_the_numeric_keys_are_found():
    keys = numeric_keys()
    assert {"lora.r", "lora.alpha", "data.max_seq_len", "data.sources[0].samples", "data.sources[0].weight",
            "train.learning_rate", "train.batch_size", "train.seed"} <= set(keys)
    assert not any(k.startswith(("model.", "quant.", "output.")) for k in keys)


@pytest.mark.parametrize("key", numeric_keys())
@pytest.mark.parametrize("value", ["true", "false"])
def test_a_boolean_is_refused_by_every_numeric_key(tmp_path, key, value):
    # pydantic's lax mode reads true as 1 and false as 0: `lora.r: true` trained at rank 1.
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, BASE), [f"{key}={value}"])
    problem = only_problem(err.value)
    assert problem.where == f"{key} (from --set)"
    assert f"not the boolean {value}" in problem.message, problem.message


def test_a_boolean_in_the_file_is_refused_at_its_line(tmp_path):
    path = write(tmp_path, BASE + "lora:\n  r: true\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    problem = only_problem(err.value)
    assert (problem.where, problem.line) == ("lora.r", 8)
    assert "must be a whole number, not the boolean true" in problem.message


def test_numbers_in_their_usual_forms_still_load(tmp_path):
    path = write(tmp_path, BASE + "lora:\n  r: 4096\n  alpha: 1\ntrain:\n  learning_rate: 1\n")
    recipe = load_recipe(path)
    assert (recipe.lora.r, recipe.lora.alpha, recipe.train.learning_rate) == (4096, 1.0, 1.0)
    # YAML 1.1 reads 2e-4 (no dot) as a string; a float key still takes it.
    assert load_recipe(path, ["train.learning_rate=2e-4"]).train.learning_rate == 2e-4
    # The largest accepted values: a learning rate of 1e3 is what the divergence tests use.
    recipe = load_recipe(path, ["train.learning_rate=1e3", "data.max_seq_len=1048576", "train.batch_size=65536",
                                "data.sources[0].samples=10000000"])
    assert (recipe.train.learning_rate, recipe.data.max_seq_len, recipe.train.batch_size) == (1e3, 2**20, 2**16)
    assert load_recipe(path, ["data.sources[0].weight=1000"]).data.sources[0].weight == 1000


# ---------------------------------------------------------------------------------------------
# Numbers beyond any real run: each ended in a traceback, some after the run directory was made.


@pytest.mark.parametrize("item, needles", [
    # int32 OverflowError in the data pipeline (2^31 and up), MemoryError from 2^31 - 1 down to about 10^9
    ("data.max_seq_len=1000000000000", ["must be at most 1,048,576", "context window"]),
    # float32 overflow inside Adam, after the run directory was made
    ("train.learning_rate=3.0e+38", ["must be at most 1,000", "2e-4"]),
    ("train.learning_rate=1001", ["must be at most 1,000"]),
    # allocation failure when PEFT builds the adapters
    ("lora.r=100000", ["must be at most 4,096", "rank"]),
    # islice() in the DataLoader's sampler takes at most sys.maxsize
    ("train.batch_size=100000000000000000000", ["must be at most 65,536", "gradient_accumulation_steps"]),
    # numpy MemoryError while sampling the rows
    ("data.sources[0].samples=1000000000000", ["must be at most 10,000,000"]),
    ("data.sources[0].weight=1000000000000", ["must be at most 1,000"]),
])
def test_numbers_beyond_any_run_say_the_valid_range_and_why(tmp_path, item, needles):
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, BASE), [item])
    problem = only_problem(err.value)
    assert problem.where == item.partition("=")[0] + " (from --set)"
    for needle in needles:
        assert needle in problem.message, problem.message


def test_a_max_seq_len_in_exponent_form_is_refused_as_not_a_whole_number(tmp_path):
    # YAML 1.1 reads 1e12 as the string '1e12', which is no integer: refused, not truncated.
    with pytest.raises(UserError) as err:
        load_recipe(write(tmp_path, BASE), ["data.max_seq_len=1e12"])
    problem = only_problem(err.value)
    assert problem.where == "data.max_seq_len (from --set)" and "'1e12'" in problem.message


@pytest.mark.parametrize("item", [
    "train.learning_rate=3.0e+38", "data.max_seq_len=1000000000000", "train.batch_size=100000000000000000000",
    "lora.r=100000", "lora.r=true",
])
def test_train_refuses_them_before_writing_anything(write_recipe, tmp_path, qlora_main, item):
    result = qlora_main("train", str(write_recipe()), "--set", item, "-q")
    assert_user_error(result, item.partition("=")[0] + " (from --set)")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# lora.r against the model's layers, when the adapters are attached


@pytest.fixture()
def tiny_base(tiny):
    from qlora_cli.model.load import load_base_model

    return load_base_model(ModelSection(name_or_path=str(tiny / "model"), dtype="float32"),
                           QuantSection(compute_dtype="float32"))


def test_a_rank_above_every_targeted_layer_is_refused_naming_the_largest(write_recipe, tmp_path, qlora_main):
    # The tiny model's widest layers are 64 x 64 (q_proj, o_proj) and 64 x 128 (mlp): rank 64 at most.
    result = qlora_main("train", str(write_recipe({"lora": {"r": 65}})), "-q")
    assert_user_error(result, "lora.r", "65", "model.layers.0.self_attn.q_proj", "64 -> 64", "at most 64")
    assert not (tmp_path / "run").exists()


def test_the_rank_is_checked_against_the_listed_modules_only(tiny_base):
    from qlora_cli.model.load import attach_lora

    # k_proj and v_proj map 64 features to 32 (2 key/value heads of 16): rank 32 at most.
    with pytest.raises(UserError) as err:
        attach_lora(tiny_base, LoraSection(r=33, target_modules=["k_proj", "v_proj"]), gradient_checkpointing=False)
    problem = only_problem(err.value)
    assert problem.where == "lora.r" and "self_attn.k_proj (64 -> 32 features)" in problem.message
    assert "at most 32" in problem.message


def test_a_rank_equal_to_the_widest_layer_is_attached(tiny_base):
    from qlora_cli.model.load import attach_lora

    model = attach_lora(tiny_base, LoraSection(r=64), gradient_checkpointing=False)
    assert model.peft_config["default"].r == 64


def _cpu_allocation_failure(*args, **kwargs):
    torch.empty(2**62, dtype=torch.uint8)  # the real error of an allocation the machine cannot satisfy


def _gpu_allocation_failure(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB.")


@pytest.mark.parametrize("fail", [_cpu_allocation_failure, _gpu_allocation_failure])
def test_running_out_of_memory_while_attaching_names_lora_r(tiny_base, monkeypatch, fail):
    import peft

    from qlora_cli.model.load import attach_lora

    monkeypatch.setattr(peft, "get_peft_model", fail)
    with pytest.raises(UserError) as err:
        attach_lora(tiny_base, LoraSection(r=8), gradient_checkpointing=False)
    problem = only_problem(err.value)
    assert problem.where == "lora.r" and "out of memory" in problem.message
    assert "lower lora.r" in problem.message


def test_other_runtime_errors_while_attaching_are_not_disguised(tiny_base, monkeypatch):
    import peft

    from qlora_cli.model.load import attach_lora

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in this tool or a library")

    monkeypatch.setattr(peft, "get_peft_model", broken)
    with pytest.raises(RuntimeError, match="a bug in this tool"):
        attach_lora(tiny_base, LoraSection(r=8), gradient_checkpointing=False)
