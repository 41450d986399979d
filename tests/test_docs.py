"""The README and docs/ stay true: the recipe reference is the schema's, the package layout is the
package's, every path and link they name exists, and every `qlora` flag they show is a real one."""

import re
from pathlib import Path

import pytest
import recipe_reference

ROOT = Path(__file__).resolve().parents[1]


def test_readme_recipe_reference_matches_schema():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert recipe_reference.readme_section(readme) == recipe_reference.reference(), (
        "README's recipe reference is stale: run `python scripts/recipe_reference.py --write`"
    )


def test_reference_documents_every_field():
    ref = recipe_reference.reference()
    from qlora_cli.recipe.schema import LoraSection, TrainSection

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


def _section(text: str, heading: str) -> str:
    """The body of the `## heading` section of a Markdown text, up to the next `## `."""
    start = text.index(f"\n## {heading}\n") + len(heading) + 5
    end = text.find("\n## ", start)
    return text[start:] if end == -1 else text[start:end]


def test_readme_layout_names_every_module_and_no_other():
    """The README's Layout section lists the package one module a line: `qlora_cli/x.py`, or a package
    line `qlora_cli/pkg/` followed by its modules indented. Adding, moving or removing a module without
    saying so there fails here."""
    layout = _section((ROOT / "README.md").read_text(encoding="utf-8"), "Layout")
    block = layout.split("```")[1]  # the first code block: the package tree
    listed, package = set(), None
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        if line.startswith("qlora_cli/") and name.endswith("/"):
            package = name
            listed.add(name + "__init__.py")
        elif line.startswith("qlora_cli/"):
            package = None
            listed.add(name)
        elif line.startswith("    ") and name.endswith(".py"):
            assert package, f"Layout: {name} is indented under no package line"
            listed.add(package + name)
    actual = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qlora_cli").rglob("*.py")}
    assert sorted(actual - listed) == [], "modules missing from the README's Layout section"
    assert sorted(listed - actual) == [], "the README's Layout section names modules that do not exist"


_REPO_PATH = re.compile(r"(?<![\w./-])((?:scripts|benchmarks|configs|tests|docs|qlora_cli|\.ci)/[\w./-]*[\w/])")
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_repository_path_and_link_in_the_docs_exists(page):
    """A script moved (scripts/ -> benchmarks/), a doc renamed or a config dropped leaves no stale
    path behind in the README or docs/: every repository path they name, and every relative link,
    exists."""
    text = page.read_text(encoding="utf-8")
    missing = sorted({path for path in _REPO_PATH.findall(text) if not (ROOT / path.rstrip(".")).exists()})
    for target in _LINK.findall(text):
        if "://" not in target and not (page.parent / target).exists():
            missing.append(f"link {target}")
    assert missing == [], f"{page.name} names paths that do not exist"


def test_every_qlora_flag_in_the_docs_is_a_real_flag():
    """Each `qlora COMMAND ... --flag` line in a code block of the README or docs/ uses a command and
    flags the command line really has."""
    import typer.main

    from qlora_cli.cli import app

    commands = typer.main.get_command(app).commands
    seen = 0
    for page in _doc_pages():
        blocks = page.read_text(encoding="utf-8").split("```")[1::2]
        for line in (ln for block in blocks for ln in block.splitlines()):
            words = line.split("#")[0].split()
            if len(words) < 2 or words[0] != "qlora":
                continue
            seen += 1
            assert words[1] in commands, f"{page.name}: `{line.strip()}`: no command {words[1]!r}"
            flags = {opt for param in commands[words[1]].params for opt in param.opts + param.secondary_opts}
            flags.add("--help")
            for word in words[2:]:
                flag = word.split("=")[0]
                if flag.startswith("-"):
                    assert flag in flags, f"{page.name}: `{line.strip()}`: {words[1]} has no {flag}"
    assert seen >= 20  # the quick start, the command examples and the guides
