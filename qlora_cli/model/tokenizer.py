"""The tokenizer a run trains, generates and is judged with: the model's own, with the run's chat
template installed (the one place that decides which template a recipe means)."""

from __future__ import annotations

from qlora_cli.data.templates import apply_template, resolve_template
from qlora_cli.model.load import load_tokenizer
from qlora_cli.recipe.schema import Recipe, default_template


def prepare_tokenizer(recipe: Recipe):
    """Load the tokenizer and install the run's template on it. Returns (tokenizer, template or None)."""
    tokenizer = load_tokenizer(recipe.model)
    name = default_template(recipe)
    if name is None:  # text only: no template
        return tokenizer, None
    template = resolve_template(name, tokenizer)
    apply_template(template, tokenizer)
    return tokenizer, template
