"""Plain conversations rendered through transformers' own compiled chat template, row after row.

`transformers.utils.chat_template_utils.render_jinja_template` (what `apply_chat_template` runs) sets
up every conversation it renders: it copies the messages into plain data (its guard against rich
objects such as images and arrays reaching the sandbox), copies reasoning fields under their other
names, and has Jinja build the template's context from its globals, a ChainMap that Jinja copies key
by key. On a dataset's short rows that setup took more than half of the rendering (the Alpaca
template on 8,000 rows: 0.32 s through it, 0.15 s here), and the rendering was the largest cost of
preprocessing beside the tokenizer.

This module skips only that setup, and only where it changes nothing: conversations whose messages
are dicts of exactly a `role` and a `content` string (copying those into plain data gives the same
data, and they hold no reasoning field to copy). It renders with transformers' compiled template
itself (its sandbox, filters, globals and `{% generation %}` tracker), its globals copied once into a
plain dict, and transformers' own loop that records the generation spans. Anything else, and any
transformers that no longer has these functions, goes through `render_jinja_template` as before.
tests/test_rendering.py checks that both give the same text and spans for every built-in template
and the real families' templates.
"""

from __future__ import annotations

from functools import lru_cache


def is_plain(messages) -> bool:
    """Messages that transformers' per-conversation copy would return unchanged: each a dict of
    exactly a role and a content, both strings (no tool calls, no reasoning, no media)."""
    return type(messages) is list and all(
        type(m) is dict and len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str
        for m in messages
    )


@lru_cache(maxsize=16)
def compiled(jinja: str):
    """transformers' compiled template for JINJA with its globals in a plain dict, or None where this
    transformers lacks what that needs (then the caller renders through render_jinja_template)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices  # noqa: F401
    except ImportError:
        return None
    template = _compile_jinja_template(jinja)
    environment = template.environment
    if not hasattr(environment, "activate_tracker"):
        return None
    # Jinja's own constructor for a template from compiled code and globals: the same code and the
    # same environment as transformers' template, with the globals (transformers' raise_exception,
    # namespace, dict, ... over Jinja's) flattened, so each render copies a dict instead of a ChainMap.
    return environment.template_class.from_code(environment, environment.compile(jinja), dict(template.globals))


def render(template, messages: list[dict], variables: dict, add_generation_prompt: bool = False) -> tuple[str, list]:
    """(text, generation spans) of one plain conversation: what render_jinja_template returns for it
    with return_assistant_tokens_mask=True and no tools or documents."""
    from transformers.utils.chat_template_utils import _render_with_assistant_indices

    text, spans = _render_with_assistant_indices(
        compiled_template=template,
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
    return text, list(spans)
