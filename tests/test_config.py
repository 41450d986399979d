"""The recipe schema, in process and without a model: loading, `--set` overrides, and every kind of
mistake a user can make, each reported as a `UserError` with the exact key path, YAML line and a
message that says what to do."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from qlora_cli.recipe.schema import DataSection, DataSource, LoraSection, ModelSection, DistributedSection, OutputSection, PreferenceSection, QuantSection, Recipe, TrainSection, json_schema
from qlora_cli.recipe.load import _apply_overrides, load_recipe, validate_recipe
from qlora_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# The smallest valid recipe. Its line layout is relied on below: sections appended to it start
# at line 7, so a section header is on line 7 and its first key on line 8.
BASE = """\
model:
  name_or_path: org/some-model
data:
  sources:
    - path: data.jsonl
      format: alpaca
"""


@pytest.fixture()
def recipe_file(tmp_path):
    """recipe_file(text) -> path of a recipe with exactly that text (dedented)."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture()
def problems_of(recipe_file):
    """problems_of(text, overrides) -> the UserError that loading it raises (fails if none is raised)."""

    def load(text: str, overrides=()) -> UserError:
        with pytest.raises(UserError) as info:
            load_recipe(recipe_file(text), overrides)
        return info.value

    return load


def where_and_line(err: UserError) -> list[tuple[str, int | None]]:
    return [(p.where, p.line) for p in err.problems]


def only_problem(err: UserError):
    assert len(err.problems) == 1, err.render()
    return err.problems[0]


# ---------------------------------------------------------------------------------------------
# Shipped recipes


def test_configs_directory_has_recipes():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "mistral7b_alpaca.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.data.sources, "a shipped recipe trains on something"


def test_shipped_recipes_keep_their_values():
    tiny = load_recipe(ROOT / "configs" / "tiny.yaml")
    assert tiny.model.dtype == "float32"
    assert tiny.train.max_steps == 200 and isinstance(tiny.train.max_steps, int)
    assert tiny.train.learning_rate == pytest.approx(5e-3)
    assert tiny.data.val_size == 40
    assert tiny.lora.dropout == 0.0
    mistral = load_recipe(ROOT / "configs" / "mistral7b_alpaca.yaml")
    assert mistral.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert mistral.model.attn_implementation == "sdpa"
    assert mistral.data.template == "alpaca"
    assert mistral.train.optimizer == "paged_adamw_8bit"
    assert mistral.train.report_to == []


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_recipe_round_trips_through_to_yaml(path, tmp_path):
    recipe = load_recipe(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(recipe.to_yaml(), encoding="utf-8")
    again = load_recipe(dumped)
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_to_yaml_is_fully_resolved_with_defaults(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(BASE), ["lora.target_modules=[q_proj, v_proj]", "train.max_steps=7"])
    text = recipe.to_yaml()
    # Every section, in schema order, with every default spelled out.
    assert [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ")] == [
        "model", "quant", "lora", "data", "train", "preference", "distributed", "output",
    ]
    assert "  storage_dtype: uint8" in text
    assert "  save_total_limit: 2" in text
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(text, encoding="utf-8")
    again = load_recipe(dumped)
    assert again == recipe
    assert again.lora.target_modules == ["q_proj", "v_proj"]
    assert again.train.max_steps == 7


# ---------------------------------------------------------------------------------------------
# Precedence: schema default < YAML < --set (in order)


def test_schema_default_applies_when_key_is_absent(recipe_file):
    recipe = load_recipe(recipe_file(BASE))
    assert recipe.lora.r == LoraSection.model_fields["r"].default == 16
    assert recipe.train.learning_rate == TrainSection.model_fields["learning_rate"].default
    assert recipe.output.dir == OutputSection.model_fields["dir"].default


def test_yaml_overrides_schema_default(recipe_file):
    recipe = load_recipe(recipe_file(BASE + "lora:\n  r: 4\n"))
    assert recipe.lora.r == 4
    assert recipe.lora.alpha == LoraSection.model_fields["alpha"].default  # untouched keys keep defaults


def test_set_overrides_yaml(recipe_file):
    recipe = load_recipe(recipe_file(BASE + "lora:\n  r: 4\n  alpha: 8\n"), ["lora.r=8"])
    assert recipe.lora.r == 8
    assert recipe.lora.alpha == 8  # from the YAML, not overridden


def test_set_overrides_schema_default(recipe_file):
    recipe = load_recipe(recipe_file(BASE), ["train.seed=7"])
    assert recipe.train.seed == 7


@pytest.mark.parametrize("overrides, expected", [(["lora.r=8", "lora.r=12"], 12), (["lora.r=12", "lora.r=8"], 8)])
def test_last_set_of_the_same_key_wins(recipe_file, overrides, expected):
    recipe = load_recipe(recipe_file(BASE + "lora:\n  r: 4\n"), overrides)
    assert recipe.lora.r == expected


def test_sets_apply_in_order_section_then_key(recipe_file):
    path = recipe_file(BASE + "lora:\n  r: 2\n  alpha: 3\n")
    recipe = load_recipe(path, ["lora={r: 4, alpha: 8}", "lora.r=6"])
    assert (recipe.lora.r, recipe.lora.alpha) == (6, 8)
    # The other way round, the whole-section value replaces the earlier key.
    recipe = load_recipe(path, ["lora.r=6", "lora={r: 4, alpha: 8}"])
    assert (recipe.lora.r, recipe.lora.alpha) == (4, 8)


def test_set_values_are_parsed_as_yaml():
    data: dict = {"train": {"max_steps": 200}}
    touched = _apply_overrides(
        data,
        ["a.int=8", "a.float=0.5", "a.exp=3.0e-4", "a.bool=true", "a.list=[q_proj, v_proj]", "a.null=null",
         "a.empty=", "a.str=hello", "a.quoted='8'", "train.max_steps=null"],
    )
    a = data["a"]
    assert type(a["int"]) is int and a["int"] == 8
    assert type(a["float"]) is float and a["float"] == 0.5
    assert type(a["exp"]) is float and a["exp"] == pytest.approx(3e-4)
    assert a["bool"] is True
    assert a["list"] == ["q_proj", "v_proj"]
    assert a["null"] is None and a["empty"] is None
    assert a["str"] == "hello"
    assert a["quoted"] == "8"
    assert data["train"]["max_steps"] is None
    assert touched == {("a", k) for k in a} | {("train", "max_steps")}


def test_set_values_reach_the_recipe_typed(recipe_file):
    recipe = load_recipe(
        recipe_file(BASE + "train:\n  max_steps: 200\n"),
        ["train.max_steps=null", "lora.dropout=0.1", "lora.use_dora=true", "lora.target_modules=[q_proj, v_proj]",
         "train.epochs=2", "model.revision=main"],
    )
    assert recipe.train.max_steps is None
    assert recipe.lora.dropout == 0.1
    assert recipe.lora.use_dora is True
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.epochs == 2.0
    assert recipe.model.revision == "main"


def test_set_into_a_list_item(recipe_file):
    recipe = load_recipe(
        recipe_file(BASE),
        ["data.sources[0].path=other.jsonl", "data.sources[0].columns.instruction=question"],
    )
    (source,) = recipe.data.sources
    assert source.path == "other.jsonl"
    assert source.format == "alpaca"  # the rest of the item is kept
    assert source.columns == {"instruction": "question"}


def test_set_into_a_list_index_that_does_not_exist(problems_of):
    err = problems_of(BASE, ["data.sources[1].path=x.jsonl"])
    p = only_problem(err)
    assert p.where == "--set data.sources[1].path=x.jsonl"
    assert "data.sources[1] does not exist" in p.message


def test_misspelled_set_key_is_an_unknown_key_from_set(problems_of):
    err = problems_of(BASE + "lora:\n  alpha: 8\n", ["lora.alpah=64"])
    p = only_problem(err)
    assert p.where == "lora.alpah (from --set)"
    assert p.line is None  # not a line of the file: it came from the command line
    assert "unknown key" in p.message and "did you mean 'alpha'" in p.message


def test_misspelled_set_key_in_a_list_item(problems_of):
    err = problems_of(BASE, ["data.sources[0].splt=test"])
    p = only_problem(err)
    assert p.where == "data.sources[0].splt (from --set)"
    assert "did you mean 'split'" in p.message


def test_bad_set_value_blames_set_not_the_yaml_line(problems_of):
    err = problems_of(BASE + "lora:\n  r: 4\n", ["lora.r=abc"])
    p = only_problem(err)
    assert (p.where, p.line) == ("lora.r (from --set)", None)
    assert "'abc'" in p.message


@pytest.mark.parametrize("item", ["lora.r", "lora.r 8", "=8", "  =8"])
def test_malformed_set_is_a_user_error(problems_of, item):
    err = problems_of(BASE, [item])
    p = only_problem(err)
    assert p.where == f"--set {item}"
    assert "KEY=VALUE" in p.message


def test_unparseable_set_is_a_user_error(problems_of):
    err = problems_of(BASE, ["lora.target_modules=[q_proj", "data.sources[x].path=a"])
    assert [p.where for p in err.problems] == ["--set lora.target_modules=[q_proj", "--set data.sources[x].path=a"]
    assert all("could not parse" in p.message for p in err.problems)


def test_every_malformed_set_is_reported_at_once(problems_of):
    err = problems_of(BASE, ["lora.r", "train.seed=3", "=1"])
    assert [p.where for p in err.problems] == ["--set lora.r", "--set =1"]


# ---------------------------------------------------------------------------------------------
# Bad recipes: key path, line and message


def test_misspelled_top_level_key(problems_of):
    err = problems_of(BASE + "lorra:\n  r: 8\n")
    p = only_problem(err)
    assert (p.where, p.line) == ("lorra", 7)
    assert p.message == "unknown key — did you mean 'lora'?"


def test_misspelled_key_in_a_section(problems_of):
    err = problems_of(BASE + "lora:\n  r: 8\n  alpah: 64\n")
    p = only_problem(err)
    assert (p.where, p.line) == ("lora.alpah", 9)
    assert "did you mean 'alpha'" in p.message
    assert "lora.alpah (line 9): unknown key — did you mean 'alpha'?" in err.render()


def test_unknown_key_without_a_near_match_lists_the_valid_keys(problems_of):
    err = problems_of(BASE + "lora:\n  zzzzzz: 1\n")
    p = only_problem(err)
    assert (p.where, p.line) == ("lora.zzzzzz", 8)
    assert "valid keys here: " + ", ".join(LoraSection.model_fields) in p.message


def test_misspelled_key_in_a_list_item(problems_of):
    text = """\
    model:
      name_or_path: org/some-model
    data:
      sources:
        - path: data.jsonl
          formt: alpaca
    """
    err = problems_of(text)
    found = {p.where: p for p in err.problems}
    assert set(found) == {"data.sources[0].formt", "data.sources[0].format"}
    assert found["data.sources[0].formt"].line == 6
    assert "did you mean 'format'" in found["data.sources[0].formt"].message
    # ...which also leaves the required key missing, located at the list item.
    assert found["data.sources[0].format"].line == 5
    assert "required key is missing" in found["data.sources[0].format"].message


def test_misspelled_optional_key_in_the_second_list_item(problems_of):
    text = BASE + "    - path: more.jsonl\n      format: alpaca\n      colums: {instruction: q}\n"
    p = only_problem(problems_of(text))
    assert (p.where, p.line) == ("data.sources[1].colums", 9)
    assert "did you mean 'columns'" in p.message


def test_wrong_type(problems_of):
    p = only_problem(problems_of(BASE + 'lora:\n  r: "abc"\n'))
    assert (p.where, p.line) == ("lora.r", 8)
    assert "integer" in p.message and "'abc'" in p.message


def test_section_that_is_not_a_mapping(problems_of):
    p = only_problem(problems_of(BASE + "lora: 8\n"))
    assert (p.where, p.line) == ("lora", 7)
    assert "is a section, not a value" in p.message and "lora: {r: 16}" in p.message


@pytest.mark.parametrize(
    "section, key, value, bound",
    [
        ("lora", "r", "0", "greater than or equal to 1"),
        ("train", "learning_rate", "0", "greater than 0"),
        ("lora", "dropout", "1.5", "less than 1"),
        ("lora", "dropout", "-0.1", "greater than or equal to 0"),
        ("train", "gradient_accumulation_steps", "0", "greater than or equal to 1"),
        ("data", "max_seq_len", "4", "greater than or equal to 8"),
    ],
)
def test_out_of_range(problems_of, section, key, value, bound):
    if section == "data":  # append to the existing data section: the key lands on line 7
        text, line = BASE + f"  {key}: {value}\n", 7
    else:
        text, line = BASE + f"{section}:\n  {key}: {value}\n", 8
    p = only_problem(problems_of(text))
    assert (p.where, p.line) == (f"{section}.{key}", line)
    assert bound in p.message
    assert p.message.endswith(f"got {float(value) if '.' in value else int(value)!r}")


def test_bad_literal_lists_the_choices(problems_of):
    p = only_problem(problems_of(BASE + "quant:\n  quant_type: nf5\n"))
    assert (p.where, p.line) == ("quant.quant_type", 8)
    assert p.message == "must be one of 'nf4' or 'fp4'; got 'nf5'"


def test_bad_literal_in_a_list(problems_of):
    p = only_problem(problems_of(BASE + "train:\n  report_to:\n    - tensorbord\n"))
    assert (p.where, p.line) == ("train.report_to[0]", 9)
    assert "'tensorboard'" in p.message and "'tensorbord'" in p.message


def test_empty_target_modules(problems_of):
    p = only_problem(problems_of(BASE + "lora:\n  target_modules: []\n"))
    assert (p.where, p.line) == ("lora.target_modules", 8)
    assert p.message == "must name at least one module, or be 'all-linear'"


def test_missing_required_key_in_a_section(problems_of):
    text = """\
    model:
      dtype: float32
    data:
      sources:
        - path: data.jsonl
          format: alpaca
    """
    p = only_problem(problems_of(text))
    assert (p.where, p.line) == ("model.name_or_path", 1)  # the section it belongs in
    assert p.message.startswith("required key is missing")
    assert ModelSection.model_fields["name_or_path"].description in p.message


def test_missing_required_section(problems_of):
    p = only_problem(problems_of("model:\n  name_or_path: org/some-model\n"))
    assert (p.where, p.line) == ("data", None)
    assert p.message.startswith("required key is missing")


def test_missing_sources_and_empty_sources(problems_of):
    p = only_problem(problems_of("model:\n  name_or_path: m\ndata:\n  max_seq_len: 64\n"))
    assert (p.where, p.line) == ("data.sources", 3)
    assert DataSection.model_fields["sources"].description in p.message
    p = only_problem(problems_of("model:\n  name_or_path: m\ndata:\n  sources: []\n"))
    assert (p.where, p.line) == ("data.sources", 4)
    assert "at least 1" in p.message


def test_rule_eval_steps_needs_validation_rows(problems_of):
    p = only_problem(problems_of(BASE + "train:\n  logging_steps: 5\n  eval_steps: 50\n"))
    assert (p.where, p.line) == ("train.eval_steps", 9)
    assert "data.val_size" in p.message


def test_rule_eval_steps_with_validation_rows_is_fine(recipe_file):
    recipe = load_recipe(recipe_file(BASE + "  val_size: 0.05\ntrain:\n  eval_steps: 50\n"))
    assert recipe.train.eval_steps == 50 and recipe.data.val_size == 0.05


def test_rule_one_warmup(problems_of):
    p = only_problem(problems_of(BASE + "train:\n  warmup_ratio: 0.1\n  warmup_steps: 10\n"))
    assert (p.where, p.line) == ("train.warmup_steps", 9)
    assert "either warmup_steps or warmup_ratio" in p.message


def test_rule_one_warmup_reports_set_origin(problems_of):
    p = only_problem(problems_of(BASE + "train:\n  warmup_ratio: 0.1\n", ["train.warmup_steps=10"]))
    assert (p.where, p.line) == ("train.warmup_steps (from --set)", None)


def test_warmup_steps_with_ratio_zeroed_is_fine(recipe_file):
    recipe = load_recipe(recipe_file(BASE + "train:\n  warmup_ratio: 0\n  warmup_steps: 10\n"))
    assert (recipe.train.warmup_steps, recipe.train.warmup_ratio) == (10, 0)


def test_warmup_steps_alone_is_accepted(recipe_file):
    recipe = load_recipe(recipe_file(BASE + "train:\n  warmup_steps: 10\n"))
    assert recipe.train.warmup_steps == 10


def test_rule_text_format_takes_no_template(problems_of):
    text = """\
    model:
      name_or_path: org/some-model
    data:
      sources:
        - path: corpus.jsonl
          format: text
      template: alpaca
    """
    p = only_problem(problems_of(text))
    assert (p.where, p.line) == ("data.template", 7)
    assert "remove it" in p.message


def test_rule_mixed_formats_need_an_explicit_template(problems_of):
    text = BASE + "    - path: chat.jsonl\n      format: messages\n"
    p = only_problem(problems_of(text))
    assert (p.where, p.line) == ("data.template", 3)  # not in the file: located at its section
    assert "alpaca, chatml" in p.message


def test_rule_dora_with_bias(problems_of):
    p = only_problem(problems_of(BASE + "lora:\n  use_dora: true\n  bias: all\n"))
    assert (p.where, p.line) == ("lora.bias", 9)
    assert "set lora.bias to none" in p.message


@pytest.mark.parametrize("value, ok", [("2.5", False), ("200.5", False), ("0.05", True), ("200", True), ("1", True)])
def test_val_size_is_a_fraction_or_a_whole_count(recipe_file, value, ok):
    path = recipe_file(BASE + f"  val_size: {value}\n")
    if ok:
        assert load_recipe(path).data.val_size == float(value)
        return
    with pytest.raises(UserError) as info:
        load_recipe(path)
    p = only_problem(info.value)
    assert (p.where, p.line) == ("data.val_size", 7)
    assert p.message == "must be a fraction below 1 (e.g. 0.05) or a whole number of rows (e.g. 200)"


@pytest.mark.parametrize("source", ["yaml", "set"])
def test_infinite_val_size_is_a_user_error(recipe_file, source):
    if source == "yaml":
        path, overrides = recipe_file(BASE + "  val_size: .inf\n"), []
    else:
        path, overrides = recipe_file(BASE), ["data.val_size=.inf"]
    with pytest.raises(UserError) as info:
        load_recipe(path, overrides)
    assert info.value.problems[0].where.startswith("data.val_size")


# ---------------------------------------------------------------------------------------------
# Every problem at once


def test_all_schema_problems_are_reported_at_once(problems_of):
    text = """\
    model:
      name_or_path: org/some-model
    quant:
      quant_type: nf5
    lora:
      r: abc
    data:
      sources:
        - path: data.jsonl
          format: alpaca
    train:
      learing_rate: 0.001
    """
    err = problems_of(text)
    assert sorted(where_and_line(err)) == [("lora.r", 6), ("quant.quant_type", 4), ("train.learing_rate", 12)]
    assert "did you mean 'learning_rate'" in {p.where: p for p in err.problems}["train.learing_rate"].message
    rendered = err.render()
    assert rendered.startswith("The recipe has problems:")
    assert rendered.count("\n  - ") == 3


def test_all_rule_problems_are_reported_at_once(problems_of):
    text = BASE + "lora:\n  use_dora: true\n  bias: all\ntrain:\n  eval_steps: 10\n  warmup_ratio: 0.1\n  warmup_steps: 5\n"
    err = problems_of(text)
    assert sorted(where_and_line(err)) == [("lora.bias", 9), ("train.eval_steps", 11), ("train.warmup_steps", 13)]


def test_yaml_and_set_problems_are_reported_together(problems_of):
    err = problems_of(BASE + "lora:\n  alpah: 3\n", ["train.seed=abc"])
    assert sorted(where_and_line(err)) == [("lora.alpah", 8), ("train.seed (from --set)", None)]


def test_validate_recipe_without_lines():
    with pytest.raises(UserError) as info:
        validate_recipe({"model": {"name_or_path": "m"}, "data": {"sources": [{"path": "x", "format": "csv"}]}})
    p = only_problem(info.value)
    assert (p.where, p.line) == ("data.sources[0].format", None)
    assert "'alpaca'" in p.message and "'csv'" in p.message


# ---------------------------------------------------------------------------------------------
# Files that are not recipes


@pytest.mark.parametrize(
    "text, kind",
    [("- model\n- data\n", "a value of type list"), ("42\n", "a value of type int"),
     ("just words\n", "a value of type str"), ("", "empty"),
     ("# only a comment\n", "empty")],
    ids=["list", "int", "str", "empty", "comment-only"],
)
def test_yaml_that_is_not_a_mapping(problems_of, tmp_path, text, kind):
    p = only_problem(problems_of(text))
    assert p.where == str(tmp_path / "recipe.yaml")
    assert "a recipe must be a mapping of sections" in p.message
    assert p.message.endswith(f"this is {kind}")


@pytest.mark.parametrize(
    "text, line",
    [
        # A list item's key indented one space short.
        ("model:\n  name_or_path: m\ndata:\n  sources:\n    - path: a.jsonl\n     format: alpaca\n", 6),
        # A tab used for indentation.
        ("model:\n\tname_or_path: m\n", 2),
        # A key nested under a scalar.
        ("model:\n  name_or_path: m\n    dtype: float32\n", 3),
    ],
    ids=["misindented", "tab", "under-scalar"],
)
def test_invalid_yaml_reports_its_line(recipe_file, text, line):
    path = recipe_file(text)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    p = only_problem(info.value)
    assert p.where == f"{path}:{line}"
    assert p.message.startswith("invalid YAML: ")


def test_binary_file_is_a_user_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError) as info:
        load_recipe(path)
    p = only_problem(info.value)
    assert p.where == str(path)
    assert "not a text file" in p.message


def test_missing_recipe_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        load_recipe(path)
    p = only_problem(info.value)
    assert p.where == str(path)
    assert "no such file" in p.message


def test_directory_instead_of_recipe(tmp_path):
    with pytest.raises(UserError) as info:
        load_recipe(tmp_path)
    assert "it is a directory" in only_problem(info.value).message


# ---------------------------------------------------------------------------------------------
# JSON Schema: the documentation


SECTIONS = [ModelSection, QuantSection, LoraSection, DataSource, DataSection, TrainSection, PreferenceSection, DistributedSection, OutputSection]


def test_json_schema_is_json_and_covers_every_section():
    schema = json.loads(json.dumps(json_schema()))
    assert set(schema["$defs"]) == {cls.__name__ for cls in SECTIONS}
    assert set(schema["properties"]) == set(Recipe.model_fields)
    assert set(schema["required"]) == {"model", "data"}
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("cls", SECTIONS, ids=[c.__name__ for c in SECTIONS])
def test_json_schema_describes_every_property(cls):
    section = json_schema()["$defs"][cls.__name__]
    assert section.get("description"), f"{cls.__name__} has no description"
    assert section["additionalProperties"] is False  # unknown keys are errors for editors too
    assert set(section["properties"]) == set(cls.model_fields)
    undocumented = [name for name, prop in section["properties"].items() if not prop.get("description", "").strip()]
    assert undocumented == []


def test_json_schema_describes_every_top_level_section():
    props = json_schema()["properties"]
    assert [name for name, prop in props.items() if not prop.get("description")] == []


def test_duplicate_keys_are_rejected_not_silently_overwritten(problems_of):
    err = problems_of(BASE + "lora:\n  r: 8\n  alpha: 16\n  r: 64\n")
    p = only_problem(err)
    assert (p.where, p.line) == ("lora.r", 10)
    assert "appears twice (also on line 8)" in p.message


def test_a_bad_union_value_gets_one_message(problems_of):
    p = only_problem(problems_of(BASE + "lora:\n  target_modules: all-lienar\n"))
    assert (p.where, p.line) == ("lora.target_modules", 8)
    assert "'all-linear'" in p.message and "'all-lienar'" in p.message


# --- data-section rules (sources, validation sets, roles)


def test_rule_one_validation_set(problems_of):
    text = BASE + "  val_size: 0.1\n  val_sources:\n    - path: val.jsonl\n      format: alpaca\n"
    p = only_problem(problems_of(text))
    assert (p.where, p.line) == ("data.val_sources", 8)
    assert "either val_sources or val_size" in p.message


def test_eval_steps_with_val_sources_is_fine(recipe_file):
    text = BASE + "  val_sources:\n    - path: val.jsonl\n      format: alpaca\ntrain:\n  eval_steps: 20\n"
    recipe = load_recipe(recipe_file(text))
    assert recipe.train.eval_steps == 20 and recipe.data.val_sources[0].path == "val.jsonl"


def test_rule_weight_or_samples(problems_of):
    p = only_problem(problems_of(BASE + "      weight: 2\n      samples: 100\n"))
    assert (p.where, p.line) == ("data.sources[0].samples", 8)
    assert "either weight or samples" in p.message


def test_rule_roles_only_for_conversations(problems_of):
    p = only_problem(problems_of(BASE + "      roles: {function_call: assistant}\n"))
    assert (p.where, p.line) == ("data.sources[0].roles", 7)
    assert "only sharegpt and messages" in p.message


def test_roles_map_only_to_canonical_roles(problems_of):
    text = BASE.replace("format: alpaca", "format: sharegpt") + "      roles: {observation: function}\n"
    p = only_problem(problems_of(text))
    assert p.where == "data.sources[0].roles.observation" and p.line == 7
    assert "'system', 'user', 'assistant' or 'tool'" in p.message


@pytest.mark.parametrize("key, value, expected", [
    ("on_too_long", "cut", "'truncate', 'drop', 'error' or 'split'"),
    ("on_bad_row", "ignore", "'skip' or 'error'"),
])
def test_policies_are_named_choices(problems_of, key, value, expected):
    p = only_problem(problems_of(BASE + f"  {key}: {value}\n"))
    assert (p.where, p.line) == (f"data.{key}", 7) and expected in p.message
