"""The direct renderer (data/rendering.py) gives what transformers' renderer gives, or is not used.

Every built-in template and each real family's template reproduced in test_model_templates.py is
rendered both ways, with and without a generation prompt, on conversations with and without a system
turn and with several replies: text and generation spans must be equal. A template's refusal
(raise_exception) must reach the caller the same way, and rows that are not plain role/content
messages, or a transformers without the functions the direct path calls, must go through
`render_jinja_template`.
"""

from __future__ import annotations

import jinja2
import pytest
from test_model_templates import LLAMA31, MISTRAL, PHI35, QWEN3, QWEN25
from transformers.utils import chat_template_utils
from transformers.utils.chat_template_utils import render_jinja_template

from qlora_cli.data import rendering
from qlora_cli.data.formats import to_canonical
from qlora_cli.data.templates import BUILTINS, BadRow, Renderer, Template, resolve_template
from qlora_cli.model.load import load_tokenizer
from qlora_cli.recipe.schema import ModelSection

FAMILIES = {"qwen25": QWEN25, "llama31": LLAMA31, "phi35": PHI35, "qwen3": QWEN3, "mistral": MISTRAL}

CONVERSATIONS = [
    [{"role": "user", "content": "What is two and two?"}, {"role": "assistant", "content": "Four."}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": " Paris \n"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))


def variables(tok) -> dict:
    return {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}


def by_transformers(jinja: str, messages: list[dict], tok, add_generation_prompt: bool):
    rendered, indices = render_jinja_template(
        conversations=[messages], chat_template=jinja, return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt, **variables(tok),
    )
    return rendered[0], list(indices[0])


TEMPLATES = {**{name: t.jinja for name, t in BUILTINS.items()}, **FAMILIES}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_direct_rendering_equals_transformers(tok, name, add_generation_prompt):
    jinja = TEMPLATES[name]
    template = rendering.compiled(jinja)
    assert template is not None, "this transformers has what the direct path needs"
    compared = 0
    for messages in CONVERSATIONS:
        assert rendering.is_plain(messages)
        try:
            expected = by_transformers(jinja, messages, tok, add_generation_prompt)
        except jinja2.TemplateError as exc:  # e.g. Mistral's "roles must alternate" on a system turn
            with pytest.raises(jinja2.TemplateError, match=str(exc)[:40]):
                rendering.render(template, messages, variables(tok), add_generation_prompt)
            continue
        assert rendering.render(template, messages, variables(tok), add_generation_prompt) == expected
        compared += 1
    assert compared >= 2


def test_generation_spans_are_found_directly(tok):
    """The built-ins' {% generation %} spans are tracked on the direct path too: each reply's span."""
    messages = CONVERSATIONS[1]
    text, spans = rendering.render(rendering.compiled(BUILTINS["chatml"].jinja), messages, variables(tok))
    assert [text[a:b] for a, b in spans] == [" Paris \n<|im_end|>", "Rome.<|im_end|>"]


def test_is_plain_only_for_role_and_content_strings():
    assert rendering.is_plain([{"role": "user", "content": "hi"}])
    assert not rendering.is_plain([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}])
    assert not rendering.is_plain([{"role": "assistant", "content": "x", "reasoning_content": "y"}])
    assert not rendering.is_plain([{"role": "user", "content": ["a", "block"]}])
    assert not rendering.is_plain(({"role": "user", "content": "hi"},))  # not a list


def test_renderer_gives_the_same_examples_with_and_without_the_direct_path(tok, monkeypatch):
    """Renderer.examples_many and Renderer.prompt, through the direct path and through transformers'
    renderer alone (as with a transformers that lacks its internals): the same examples, spans and
    refusals, on plain rows and on a row with tool calls (never direct) in the same batch."""
    tok.chat_template = None
    with_calls = to_canonical({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}, "messages", {})
    assert not rendering.is_plain(with_calls["messages"])
    rows = [(m, None) for m in CONVERSATIONS] + [(with_calls["messages"], None)]
    for name in ("chatml", "llama3", "alpaca"):
        renderer = Renderer(resolve_template(name, tok), tok)
        direct = renderer.examples_many(rows)
        prompt = renderer.prompt(CONVERSATIONS[1][:-1])
        with monkeypatch.context() as m:
            m.setattr(rendering, "compiled", lambda jinja: None)
            through_transformers = renderer.examples_many(rows)
            assert renderer.prompt(CONVERSATIONS[1][:-1]) == prompt
        assert [repr(x) for x in direct] == [repr(x) for x in through_transformers], name
        assert not isinstance(direct[0], Exception)


def test_a_refusal_on_the_direct_path_is_the_rows_own(tok):
    """A template's raise_exception on a plain row refuses that row only, as through transformers."""
    template = Template("strict", MISTRAL, roles=None, tools=None)
    renderer = Renderer(template, tok)
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    bad = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"},
           {"role": "assistant", "content": "Hello."}]
    out = renderer.examples_many([(ok, None), (bad, None), (ok, None)])
    assert isinstance(out[1], BadRow) and "alternate" in str(out[1])
    assert not isinstance(out[0], Exception) and out[0] == out[2]


def test_without_transformers_internals_the_direct_path_is_off(monkeypatch):
    """compiled() answers None, so callers render through render_jinja_template, when transformers no
    longer has the functions it uses."""
    monkeypatch.delattr(chat_template_utils, "_render_with_assistant_indices")
    rendering.compiled.cache_clear()
    try:
        assert rendering.compiled(BUILTINS["chatml"].jinja + " ") is None
    finally:
        rendering.compiled.cache_clear()
