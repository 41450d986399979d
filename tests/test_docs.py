"""The README stays true: its recipe reference is the schema's."""

from pathlib import Path

import recipe_reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_recipe_reference_matches_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert recipe_reference.readme_section(readme) == recipe_reference.reference(), (
        "README's recipe reference is stale: run `python scripts/recipe_reference.py --write`"
    )


def test_reference_documents_every_field():
    ref = recipe_reference.reference()
    from qlora_cli.recipe.schema import TrainSection, LoraSection

    for name in TrainSection.model_fields:
        assert f"`train.{name}`" in ref
    for name in LoraSection.model_fields:
        assert f"`lora.{name}`" in ref


def test_docs_page_and_json_schema_file_match_the_schema():
    assert (ROOT / "docs" / "recipe.md").read_text(encoding="utf-8") == recipe_reference.docs_page(), (
        "docs/recipe.md is stale: run `python scripts/recipe_reference.py --write`"
    )
    assert (ROOT / "docs" / "recipe.schema.json").read_text(encoding="utf-8") == recipe_reference.schema_text()


def test_json_schema_accepts_every_shipped_recipe_and_rejects_a_misspelled_key():
    import json

    import jsonschema
    import yaml

    from qlora_cli.recipe.load import load_recipe

    schema = json.loads((ROOT / "docs" / "recipe.schema.json").read_text())
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        assert path.read_text().splitlines()[0] == recipe_reference.MODELINE, f"{path.name}: no schema modeline"
        data = yaml.safe_load(path.read_text())
        jsonschema.validate(data, schema)  # what an editor checks
        load_recipe(path)  # what qlora checks
        data["lora"]["alpah"] = 64
        try:
            jsonschema.validate(data, schema)
        except jsonschema.ValidationError as exc:
            assert "alpah" in exc.message
        else:
            raise AssertionError(f"{path.name}: the JSON Schema accepted a misspelled key")
