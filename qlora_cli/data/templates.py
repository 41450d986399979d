"""Prompt templates: how a conversation becomes the exact text the model is trained on.

Every template is a Jinja chat template, installed on the tokenizer and saved with it in the run
directory. So `qlora generate`, `qlora eval` and plain `tokenizer.apply_chat_template` all render
prompts exactly as training did: there is one renderer, not one for training and one for
inference.

    template = resolve_template("alpaca", tokenizer)   # or chatml, llama3, raw, tokenizer, my.jinja
    apply_template(template, tokenizer)
    text, spans = Renderer(template, tokenizer).render(messages)   # spans: characters that carry loss

Built-in templates wrap assistant content in `{% generation %}` blocks, and transformers reports
where each block landed in the rendered text. Templates without such blocks (most tokenizers' own)
get the same spans by rendering prefixes: the text the conversation has before an assistant turn
(with the generation prompt) and after it. Either way the spans are character ranges of the
final text, and tokens are masked by their offsets in the tokenization of that text (see
tokenize.py): the tokens actually trained, so the prompt/response boundary bug (tokenizing the
prompt and the response apart gives different boundary tokens) cannot happen. Each span ends with
the template's stop token (EOS, <|im_end|> for ChatML, <|eot_id|> for Llama 3), so the model
learns to stop.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT, BadRow
from qlora_cli.errors import UserError

# A BOS token, when the tokenizer has one: apply_chat_template tokenizes without adding special
# tokens, so the template is the only place BOS can come from.
_BOS = "{%- if bos_token %}{{ bos_token }}{%- endif %}"

ALPACA = (
    _BOS
    + "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{%- set turns = messages[1:] %}"
    + "{%- else %}{{ '" + ALPACA_SYSTEM_NO_INPUT + "' }}{%- set turns = messages %}{%- endif %}"
    + "{%- for m in turns %}"
    + "{%- if m['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' + m['content'] }}"
    + "{%- elif m['role'] == 'assistant' %}{{ '\\n\\n### Response:\\n' }}"
    + "{%- generation %}{{ m['content'] + eos_token }}{%- endgeneration %}"
    + "{%- endif %}{%- endfor %}"
    + "{%- if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{%- endif %}"
)

# Tool definitions (a `tools` field in sharegpt/messages data) go into the system turn, one JSON
# object a line, as LLaMA-Factory and Qwen's templates do; a leading system message is kept first.
_TOOLS_TEXT = (
    "{%- set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{%- set tools_text = system + 'You can call these tools:\\n' + (tools | map('tojson') | join('\\n')) %}"
)

CHATML = (
    _BOS
    + "{%- if tools %}" + _TOOLS_TEXT
    + "{{ '<|im_start|>system\\n' + tools_text | trim + '<|im_end|>\\n' }}"
    + "{%- if messages and messages[0]['role'] == 'system' %}{%- set messages = messages[1:] %}{%- endif %}"
    + "{%- endif %}"
    + "{%- for m in messages %}"
    + "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    + "{%- generation %}{{ m['content'] + '<|im_end|>' }}{%- endgeneration %}{{ '\\n' }}"
    + "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    + "{%- endif %}{%- endfor %}"
    + "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Meta's Llama 3 instruct layout (content trimmed, as Meta's template does). Tool results use
# Llama 3.1's `ipython` role.
LLAMA3 = (
    _BOS
    + "{%- if tools %}" + _TOOLS_TEXT
    + "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + tools_text | trim + '<|eot_id|>' }}"
    + "{%- if messages and messages[0]['role'] == 'system' %}{%- set messages = messages[1:] %}{%- endif %}"
    + "{%- endif %}"
    + "{%- for m in messages %}"
    + "{%- if m['role'] == 'assistant' %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    + "{%- generation %}{{ m['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    + "{%- else %}{{ '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else m['role']) "
    + "+ '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    + "{%- endif %}{%- endfor %}"
    + "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Prompt and completion concatenated as they are, for prompt_completion data whose prompts
# already carry their own formatting. System messages are ignored.
RAW = (
    _BOS
    + "{%- for m in messages %}"
    + "{%- if m['role'] == 'assistant' %}{%- generation %}{{ m['content'] + eos_token }}{%- endgeneration %}"
    + "{%- elif m['role'] == 'user' %}{{ m['content'] }}{%- endif %}{%- endfor %}"
)


@dataclass(frozen=True)
class Template:
    """A resolved template.

    stop: the token that ends an assistant turn (None = the tokenizer's EOS).
    roles: the roles it renders (None = unknown: checked per row by looking for the content).
    tokens: markers that must be single tokens of the tokenizer.
    tools: whether it renders tool definitions (None = unknown: checked per row, as roles).
    """

    name: str
    jinja: str
    stop: str | None = None
    roles: frozenset[str] | None = None
    tokens: tuple[str, ...] = field(default=())
    tools: bool | None = None

    @property
    def has_generation_blocks(self) -> bool:
        return bool(_GENERATION_TAG.search(self.jinja))


_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_ALL_ROLES = frozenset({"system", "user", "assistant", "tool"})

BUILTINS = {
    # Alpaca has one system preamble (first message only) and instruction/response turns.
    "alpaca": Template("alpaca", ALPACA, roles=frozenset({"system", "user", "assistant"}), tools=False),
    "chatml": Template(
        "chatml", CHATML, stop="<|im_end|>", roles=_ALL_ROLES, tokens=("<|im_start|>", "<|im_end|>"), tools=True
    ),
    "llama3": Template(
        "llama3",
        LLAMA3,
        stop="<|eot_id|>",
        roles=_ALL_ROLES,
        tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        tools=True,
    ),
    "raw": Template("raw", RAW, roles=frozenset({"user", "assistant"}), tools=False),
}

def resolve_template(name: str, tokenizer, where: str = "data.template") -> Template:
    """Find a template by name (a built-in or 'tokenizer') or .jinja path, and check it fits the tokenizer.

    Templates without `{% generation %}` blocks are accepted: their loss spans come from prefix
    renders (Renderer).
    """
    if name in BUILTINS:
        template = BUILTINS[name]
    elif name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError.single(where, "the tokenizer has no chat template: choose alpaca, chatml, llama3 or raw")
        template = Template("tokenizer", tokenizer.chat_template)
    elif name.endswith((".jinja", ".j2")):
        path = Path(name)
        if not path.is_file():
            raise UserError.single(where, f"template file not found: {path}")
        template = Template(path.name, path.read_text(encoding="utf-8"))
    else:
        choices = [*BUILTINS, "tokenizer"]
        near = difflib.get_close_matches(name, choices, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise UserError.single(
            where, f"unknown template {name!r}: {hint}use one of {', '.join(choices)}, or a path to a .jinja file"
        )

    stop = template.stop or tokenizer.eos_token
    if stop is None:
        raise UserError.single(where, "the tokenizer has no EOS token, so the model could not learn to stop")
    _check_syntax(template, tokenizer, where)
    split = [t for t in template.tokens if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if split:
        raise UserError.single(
            where,
            f"template {template.name!r} needs {', '.join(split)} as single tokens, and this tokenizer splits "
            "them, so the model could not learn where turns end or stop on them. Use a template this model was "
            "trained with ('tokenizer'), or alpaca/raw",
        )
    return template


def _check_syntax(template: Template, tokenizer, where: str) -> None:
    # Compiling happens on first render; do one now so a typo in a .jinja file is reported as the
    # recipe's problem, not as a failure on row 1. (What a template raises for a given row is that
    # row's problem: Renderer.render.)
    import jinja2

    try:
        Renderer(template, tokenizer).render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    except jinja2.TemplateSyntaxError as exc:
        raise UserError.single(where, f"template {template.name!r} is not valid Jinja: {exc.message} (line {exc.lineno})")
    except (jinja2.TemplateError, TemplateMismatch, BadRow):
        pass


def apply_template(template: Template, tokenizer) -> None:
    """Install the template on the tokenizer, so it is used everywhere and saved with it.

    For templates with their own stop token (ChatML), that token becomes the tokenizer's EOS, so
    generation stops where training taught the model to stop.
    """
    tokenizer.chat_template = template.jinja
    if template.stop:
        tokenizer.eos_token = template.stop


class TemplateMismatch(ValueError):
    """A conversation the template cannot render faithfully (a role it drops, a non-prefix-stable layout)."""


class Renderer:
    """Renders canonical conversations to text plus the character spans that carry the loss.

    One Renderer per template and tokenizer; `render` is called once per row (in worker
    processes, so it holds only picklable state and compiles lazily).
    """

    def __init__(self, template: Template, tokenizer):
        self.template = template
        # What apply_chat_template passes to the template: bos_token, eos_token, ...
        self.variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}

    def render(
        self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """(text, [(start, end), ...]) with one span per assistant turn (its content and stop token)."""
        import jinja2

        self._check_roles(messages, tools)
        try:
            if self.template.has_generation_blocks:
                text, spans = self._render(messages, tools, add_generation_prompt, with_spans=True)
            else:
                text, spans = self._render(messages, tools, add_generation_prompt), self._prefix_spans(messages, tools)
        except jinja2.TemplateSyntaxError:
            raise  # the template's problem, not the row's (resolve_template reports it)
        except jinja2.TemplateError as exc:  # e.g. a tokenizer template's raise_exception("roles must alternate")
            raise BadRow(f"template {self.template.name!r} refused this row: {exc}") from None
        self._check_content_rendered(messages, tools, text)
        return text, spans

    def _render(self, messages, tools=None, add_generation_prompt=False, with_spans=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, indices = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self.template.jinja,
            return_assistant_tokens_mask=with_spans,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )
        return (rendered[0], list(indices[0])) if with_spans else rendered[0]

    def _prefix_spans(self, messages, tools) -> list[tuple[int, int]]:
        # For a template without generation blocks: assistant turn k is what rendering messages[:k+1]
        # adds to rendering messages[:k] with the generation prompt. That only holds when each
        # render is a prefix of the next (true of ChatML-, Llama- and Mistral-style templates);
        # a template that rewrites earlier turns (e.g. strips past reasoning) is rejected.
        full = self._render(messages, tools)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:k], tools, add_generation_prompt=True) if k else ""
            after = self._render(messages[: k + 1], tools)
            if not (after.startswith(before) and full.startswith(after)):
                raise TemplateMismatch(
                    f"template {self.template.name!r} renders a conversation differently from its beginning, so "
                    "the assistant turns cannot be located. Add {% generation %} blocks around assistant content, "
                    "or use a built-in template"
                )
            end = len(after)
            while end > len(before) and after[end - 1].isspace():  # a newline after the stop token is not a reply
                end -= 1
            spans.append((len(before), end))
        return spans

    def _check_roles(self, messages, tools) -> None:
        if tools and self.template.tools is False:
            raise TemplateMismatch(
                f"template {self.template.name!r} has no place for the row's tool definitions (they would be "
                "dropped): use chatml or llama3, or a template that renders `tools`"
            )
        roles = self.template.roles
        if roles is None:
            return
        for i, m in enumerate(messages):
            if m["role"] not in roles or (m["role"] == "system" and self.template.name == "alpaca" and i > 0):
                where = "after the first turn " if m["role"] in roles else ""
                raise TemplateMismatch(
                    f"template {self.template.name!r} has no place for a {m['role']!r} message {where}(it would be "
                    f"dropped): map that role to one it renders ({', '.join(sorted(roles))}) with roles:, "
                    "or use chatml or llama3"
                )

    def _check_content_rendered(self, messages, tools, text: str) -> None:
        # For templates we did not write, the only proof that nothing was dropped is finding it.
        if tools and self.template.tools is None:
            names = [t.get("name") or (t.get("function") or {}).get("name") for t in tools]  # plain or OpenAI-style
            missing = [n for n in names if not n or str(n) not in text]
            if missing:
                raise TemplateMismatch(
                    f"template {self.template.name!r} dropped the tool definitions ({', '.join(map(str, missing))}): "
                    "use chatml or llama3, or a template that renders `tools`"
                )
        if self.template.roles is not None:
            return
        for m in messages:
            if m["content"].strip() not in text:
                raise TemplateMismatch(
                    f"template {self.template.name!r} dropped a {m['role']!r} message: map that role to one it "
                    "renders with roles:, or use a built-in template"
                )
