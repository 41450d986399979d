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
    from qlora_cli.config import TrainSection, LoraSection

    for name in TrainSection.model_fields:
        assert f"`train.{name}`" in ref
    for name in LoraSection.model_fields:
        assert f"`lora.{name}`" in ref
