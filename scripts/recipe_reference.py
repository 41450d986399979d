"""Print the recipe reference (Markdown) from the schema, the single source of truth.

    python scripts/recipe_reference.py            # print
    python scripts/recipe_reference.py --write    # update README.md's section, docs/recipe.md and
                                                  # docs/recipe.schema.json

tests/test_docs.py fails when any of the three and the schema disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from pydantic import BaseModel

from qlora_cli.recipe.schema import Recipe
from qlora_cli.recipe.load import _section_type

BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "recipe.md"
SCHEMA = ROOT / "docs" / "recipe.schema.json"
MODELINE = "# yaml-language-server: $schema=../docs/recipe.schema.json"  # first line of each shipped recipe


def _type_name(annotation) -> str:
    """A readable type: `int`, `one of nf4, fp4`, `list of str`, `str or null`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value)}`"


def reference() -> str:
    out: list[str] = []

    def section(model: type[BaseModel], prefix: str) -> None:
        rows = []
        nested = []
        for name, field in model.model_fields.items():
            sub = _section_type(field.annotation)
            key = f"{prefix}{name}"
            if sub is not None:
                is_list = "list" in str(field.annotation)
                nested.append((sub, f"{key}[]." if is_list else f"{key}."))
                if not is_list:
                    continue
            kind = "list of sections" if sub is not None else _type_name(field.annotation)
            rows.append(f"| `{key}` | {kind} | {_default(field)} | {field.description or ''} |")
        if rows:
            title = prefix.rstrip(".") or "recipe"
            out.append(f"### `{title}`\n\n{model.__doc__.strip()}\n")
            out.append("| key | type | default | meaning |\n|---|---|---|---|")
            out.extend(rows)
            out.append("")
        for sub, sub_prefix in nested:
            section(sub, sub_prefix)

    section(Recipe, "")
    return "\n".join(out).rstrip() + "\n"


def docs_page() -> str:
    return (
        "# Recipe reference\n\n"
        "Generated from the schema by `python scripts/recipe_reference.py --write`; do not edit by hand.\n"
        "The JSON Schema beside this file (`recipe.schema.json`, also printed by `qlora schema`) gives\n"
        "editors completion and checking: shipped recipes start with\n\n"
        f"    {MODELINE}\n\n" + reference()
    )


def schema_text() -> str:
    from qlora_cli.recipe.schema import json_schema

    return json.dumps(json_schema(), indent=2) + "\n"


def readme_section(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


if __name__ == "__main__":
    ref = reference()
    if "--write" in sys.argv:
        text = README.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        README.write_text(head + BEGIN + "\n" + ref + END + rest.split(END, 1)[1], encoding="utf-8")
        DOCS.parent.mkdir(exist_ok=True)
        DOCS.write_text(docs_page(), encoding="utf-8")
        SCHEMA.write_text(schema_text(), encoding="utf-8")
    else:
        print(ref, end="")
