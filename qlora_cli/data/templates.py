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
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from qlora_cli.data import rendering
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

# An assistant turn's tool calls (OpenAI's `tool_calls`, arguments parsed to objects by formats.py)
# follow its content, one JSON object each, in the layout of the template's family: Hermes/Qwen's
# <tool_call> tags for ChatML, Llama 3.1's bare {"name", "parameters"} for Llama 3. They are inside
# the generation block: the model learns to make the calls.
_CALLS = "{%- set f = call.function if call.function is defined else call %}"
_CHATML_CALLS = (
    "{%- for call in m['tool_calls'] or [] %}" + _CALLS
    + "{{ ('\\n' if m['content'] or not loop.first else '') + '<tool_call>\\n' "
    + "+ {'name': f.name, 'arguments': f.arguments} | tojson + '\\n</tool_call>' }}{%- endfor %}"
)
_LLAMA3_CALLS = (
    "{%- for call in m['tool_calls'] or [] %}" + _CALLS
    + "{{ ('\\n' if m['content'] | trim or not loop.first else '') "
    + "+ {'name': f.name, 'parameters': f.arguments} | tojson }}{%- endfor %}"
)

CHATML = (
    _BOS
    + "{%- if tools %}" + _TOOLS_TEXT
    + "{{ '<|im_start|>system\\n' + tools_text | trim + '<|im_end|>\\n' }}"
    + "{%- if messages and messages[0]['role'] == 'system' %}{%- set messages = messages[1:] %}{%- endif %}"
    + "{%- endif %}"
    + "{%- for m in messages %}"
    + "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    + "{%- generation %}{{ m['content'] }}" + _CHATML_CALLS + "{{ '<|im_end|>' }}{%- endgeneration %}{{ '\\n' }}"
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
    + "{%- generation %}{{ m['content'] | trim }}" + _LLAMA3_CALLS + "{{ '<|eot_id|>' }}{%- endgeneration %}"
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
    folds_system: the template rejects (or drops) a system message, so its text is prepended to the
        first user turn instead (resolve_template finds out).
    """

    name: str
    jinja: str
    stop: str | None = None
    roles: frozenset[str] | None = None
    tokens: tuple[str, ...] = field(default=())
    tools: bool | None = None
    folds_system: bool = False

    @cached_property  # asked for every row: the search over the template's text is done once
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
    if template.roles is None and _rejects_system(template, tokenizer):
        template = replace(template, folds_system=True)
    split = [t for t in template.tokens if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if split:
        # 'tokenizer' only where there is a template to use: else resolving it fails next.
        instead = ("Use the template this model was trained with ('tokenizer', its own chat template), or alpaca/raw"
                   if getattr(tokenizer, "chat_template", None) else
                   "This tokenizer has no chat template of its own: use alpaca or raw, which need no special tokens")
        raise UserError.single(
            where,
            f"template {template.name!r} needs {', '.join(split)} as single tokens, and this tokenizer splits "
            f"them, so the model could not learn where turns end or stop on them. {instead}",
        )
    return template


def _check_syntax(template: Template, tokenizer, where: str) -> None:
    # Compiling happens on first render; do one now so a typo in a .jinja file is reported as the
    # recipe's problem, not as a failure on row 1. (What a template raises for a given row is that
    # row's problem: Renderer.render.)
    import jinja2

    try:
        Renderer(template, tokenizer).examples([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
    except jinja2.TemplateSyntaxError as exc:
        raise UserError.single(where, f"template {template.name!r} is not valid Jinja: {exc.message} (line {exc.lineno})")
    except (jinja2.TemplateError, TemplateMismatch, BadRow):
        pass


_PROBE_SYSTEM = "qlora-probe-system-text"


def _rejects_system(template: Template, tokenizer) -> bool:
    """Whether a template we did not write refuses a system message (Mistral v0.1-v0.2: "Only user and
    assistant roles are supported", Gemma: "System role not supported") or leaves its text out, while
    it renders the same conversation without one."""
    import jinja2

    renderer = Renderer(template, tokenizer)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        renderer._render(turns)
    except jinja2.TemplateError:
        return False  # it refuses more than the system role: rows will say what
    try:
        return _PROBE_SYSTEM not in renderer._render([{"role": "system", "content": _PROBE_SYSTEM}, *turns])
    except jinja2.TemplateError:
        return True


def system_notice(template: Template) -> str | None:
    """What a user should be told about how the template treats system messages, if anything."""
    if not template.folds_system:
        return None
    return (
        f"template {template.name!r} has no system role: a system message (alpaca's preamble, a system turn, --system) is "
        "prepended to the first user turn, as this model's card advises"
    )


def apply_template(template: Template, tokenizer) -> None:
    """Install the template on the tokenizer, so it is used everywhere and saved with it.

    For templates with their own stop token (ChatML), that token becomes the tokenizer's EOS, so
    generation stops where training taught the model to stop.
    """
    tokenizer.chat_template = template.jinja
    if template.stop:
        tokenizer.eos_token = template.stop


class TemplateMismatch(ValueError):
    """A conversation the template cannot render faithfully (a role it drops, a turn it cannot place)."""


def _reply_spans(messages: list[dict], spans: list) -> list:
    """The generation blocks' spans that train something: with one block per assistant message (as in
    the built-ins), an empty reply's block is left out."""
    replies = [m for m in messages if m["role"] == "assistant"]
    if len(spans) == len(replies):
        return [span for span, m in zip(spans, replies) if _has_reply(m)]
    return spans


def _has_reply(message: dict) -> bool:
    """Whether an assistant message says anything: content or tool calls. An empty one trains nothing,
    not even its end-of-turn token (the data does not say the model should stop there)."""
    return bool(message["content"].strip() or message.get("tool_calls"))


def _rendered_forms(text: str) -> tuple[str, ...]:
    """How a template may write a message's text: as is, or through `tojson` (Llama 3.1 renders a
    tool message's content that way: quoted, with escapes)."""
    import json

    text = text.strip()
    return text, json.dumps(text, ensure_ascii=False), json.dumps(text)


def _fold_system(messages: list[dict]) -> list[dict]:
    """The system text prepended to the first user turn, once: what the model cards of templates that
    reject a system role (Mistral v0.1-v0.2, Gemma) advise."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    first_user = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first_user is None:
        raise TemplateMismatch(
            "the template has no system role, and this conversation has no user turn to fold the system text "
            "into: add a user turn, or use a built-in template"
        )
    user = rest[first_user]
    rest = list(rest)
    rest[first_user] = {**user, "content": f"{system}\n\n{user['content']}" if system.strip() else user["content"]}
    return rest


class Renderer:
    """Renders canonical conversations to text plus the character spans that carry the loss.

    One Renderer per template and tokenizer; `examples` is called once per row (in worker
    processes, so it holds only picklable state and compiles lazily).
    """

    def __init__(self, template: Template, tokenizer):
        self.template = template
        # What apply_chat_template passes to the template: bos_token, eos_token, ...
        self.variables = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        # Special tokens, longest first: a template may close the whole conversation with one (Phi-3's
        # EOS after the last turn), which is not part of the turn once another follows.
        added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
        self.specials = sorted(
            {t for t in [*tokenizer.all_special_tokens, *added, *self.variables.values()] if t}, key=len, reverse=True
        )

    def examples(self, messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
        """[(text, [(start, end), ...]), ...]: usually one example, whose spans are its assistant replies
        (each one's content, tool calls and stop token). A template that rewrites earlier turns once the
        conversation goes on (Qwen3 and DeepSeek-R1 drop past reasoning) gives the turns it rewrites an
        example each, in the context the template gives them at inference time."""
        messages = self._prepare(messages, tools)
        examples = self._guarded(lambda: self._examples(messages, tools))
        self._check_content_rendered(messages, tools, [text for text, _ in examples])
        return examples

    def examples_many(self, rows: list[tuple[list[dict], list[dict] | None]]) -> list:
        """examples() of each (messages, tools) in ROWS, or the TemplateMismatch or BadRow it raised.

        The rows without tools of a template with generation blocks (every built-in) are rendered
        together (_render_many): plain role/content rows straight through the compiled template
        (rendering.py), the others in one call of transformers' renderer, whose setup per call (the
        template's lookup, the special tokens copied into plain data) was a quarter of the rendering's
        time. One row's template error fails the batch, and then each of its rows is rendered alone, so
        that only that row is refused.
        """
        out: list = [None] * len(rows)
        together = []  # (index in rows, prepared messages)
        for k, (messages, tools) in enumerate(rows):
            try:
                if tools or not self.template.has_generation_blocks:
                    out[k] = self.examples(messages, tools)
                else:
                    together.append((k, self._prepare(messages, tools)))
            except (TemplateMismatch, BadRow) as exc:
                out[k] = exc
        if not together:
            return out
        try:
            rendered = self._guarded(lambda: self._render_many([messages for _, messages in together]))
        except BadRow:
            rendered = None
        for j, (k, messages) in enumerate(together):
            try:
                if rendered is None:
                    out[k] = self.examples(*rows[k])
                    continue
                text, spans = rendered[j]
                self._check_content_rendered(messages, None, [text])
                out[k] = [(text, _reply_spans(messages, spans))]
            except (TemplateMismatch, BadRow) as exc:
                out[k] = exc
        return out

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The text a reply to MESSAGES is generated from: the conversation and the generation prompt."""
        messages = self._prepare(messages, tools)
        return self._guarded(lambda: self._render(messages, tools, add_generation_prompt=True))

    def _prepare(self, messages, tools):
        if self.template.folds_system:
            messages = _fold_system(messages)
        self._check_roles(messages, tools)
        return messages

    def _guarded(self, render):
        import jinja2

        try:
            return render()
        except jinja2.TemplateSyntaxError:
            raise  # the template's problem, not the row's (resolve_template reports it)
        except jinja2.TemplateError as exc:  # e.g. a tokenizer template's raise_exception("roles must alternate")
            raise BadRow(f"template {self.template.name!r} refused this row: {exc}") from None

    def _render(self, messages, tools=None, add_generation_prompt=False, with_spans=False):
        from transformers.utils.chat_template_utils import render_jinja_template

        direct = rendering.compiled(self.template.jinja) if tools is None and rendering.is_plain(messages) else None
        if direct is not None:  # the same template, without transformers' setup per call (rendering.py)
            text, spans = rendering.render(direct, messages, self.variables, add_generation_prompt)
            return (text, spans) if with_spans else text
        rendered, indices = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self.template.jinja,
            return_assistant_tokens_mask=with_spans,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )
        return (rendered[0], list(indices[0])) if with_spans else rendered[0]

    def _render_many(self, conversations):
        """[(text, generation spans), ...] of conversations without tools, in one call."""
        from transformers.utils.chat_template_utils import render_jinja_template

        # Plain role/content rows (nearly every dataset's) through the same template without
        # transformers' setup per conversation, which was half of the rendering (rendering.py); the
        # others, if any, through transformers' renderer in one call.
        direct = rendering.compiled(self.template.jinja)
        out = [rendering.render(direct, m, self.variables) if direct is not None and rendering.is_plain(m) else None
               for m in conversations]
        rest = [k for k, done in enumerate(out) if done is None]
        if not rest:
            return out
        rendered, indices = render_jinja_template(
            conversations=[conversations[k] for k in rest],
            chat_template=self.template.jinja,
            return_assistant_tokens_mask=True,
            **self.variables,
        )
        for k, text, spans in zip(rest, rendered, indices):
            out[k] = (text, list(spans))
        return out

    def _examples(self, messages, tools):
        if self.template.has_generation_blocks:
            text, spans = self._render(messages, tools, with_spans=True)
            return [(text, _reply_spans(messages, spans))]
        return self._located_examples(messages, tools)

    def _located_examples(self, messages, tools):
        # A template without generation blocks: reply k is what rendering messages[:k+1] adds to the
        # generation prompt after messages[:k] (the text the model is given at inference time), up to
        # the end of its stop token. When the whole conversation's rendering holds that turn as is, the
        # reply is trained there; when the template writes it differently once more turns follow, it
        # gets an example of its own, ending with it.
        full = self._render(messages, tools)
        spans, alone = [], []
        for k, message in enumerate(messages):
            if message["role"] != "assistant" or not _has_reply(message):
                continue
            upto = full if k == len(messages) - 1 else self._render(messages[: k + 1], tools)
            start, end = self._reply_span(messages, k, upto, tools)
            turn = self._turn_in(full, upto[:end])
            if turn is not None and turn > start:
                spans.append((start, turn))
            else:
                alone.append((upto[:end], [(start, end)]))
        return ([(full, spans)] if spans or not alone else []) + alone

    def _turn_in(self, full: str, turn: str) -> int | None:
        """Where TURN (a conversation rendered up to the end of a reply) ends in FULL, when FULL holds it:
        as is, or without a special token the template adds only at the very end (Phi-3's EOS)."""
        if full.startswith(turn):
            return len(turn)
        cut = turn
        while (closing := next((s for s in self.specials if cut.endswith(s)), None)) is not None:
            cut = cut[: -len(closing)].rstrip()
            # What is left must still end on a special token: the reply's own stop token.
            if full.startswith(cut) and any(cut.endswith(s) for s in self.specials):
                return len(cut)
        return None

    def _reply_span(self, messages, k: int, upto: str, tools) -> tuple[int, int]:
        """Where reply k starts and ends in UPTO (the conversation rendered up to and including it)."""
        import jinja2

        try:
            prompt = self._render(messages[:k], tools, add_generation_prompt=True)
        except jinja2.TemplateError:  # e.g. a template that reads messages[0] cannot render no messages
            prompt = None
        if prompt is not None:
            if not (upto.startswith(prompt) and len(prompt) < len(upto.rstrip())):
                raise TemplateMismatch(
                    f"template {self.template.name!r} renders a conversation differently from its beginning: the "
                    f"assistant turn at message {k} does not follow the generation prompt, so it cannot be trained "
                    "as it will be generated. Add {% generation %} blocks around assistant content, or use a "
                    "built-in template"
                )
            return len(prompt), len(upto.rstrip())  # a newline after the stop token is not part of the reply
        # No generation prompt leads into this turn (a conversation that opens with the assistant, and a
        # template that cannot render an empty one): the reply is its own content and the stop token(s)
        # right after it, never the preamble before it.
        content = messages[k]["content"].strip()
        at = upto.rfind(content) if content else -1
        if at < 0:
            raise TemplateMismatch(
                f"template {self.template.name!r}: the assistant turn at message {k} cannot be located in the "
                "rendered conversation. Add {% generation %} blocks around assistant content, or use a built-in "
                "template"
            )
        end = at + len(content)
        while (stop := next((t for t in self.specials if upto[end:].lstrip().startswith(t)), None)) is not None:
            end = len(upto) - len(upto[end:].lstrip()) + len(stop)
        return at, end

    def _check_roles(self, messages, tools) -> None:
        if tools and self.template.tools is False:
            raise TemplateMismatch(
                f"template {self.template.name!r} has no place for the row's tool definitions (they would be "
                "dropped): use chatml or llama3, or a template that renders `tools`"
            )
        if self.template.tools is False and any(m.get("tool_calls") for m in messages):
            raise TemplateMismatch(
                f"template {self.template.name!r} has no place for an assistant's tool_calls (they would be "
                "dropped): use chatml or llama3, or a template that renders tool calls"
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

    def _check_content_rendered(self, messages, tools, texts: list[str]) -> None:
        # For templates we did not write, the only proof that nothing was dropped is finding it.
        def found(piece: str) -> bool:
            return any(form in text for text in texts for form in _rendered_forms(piece))

        if tools and self.template.tools is None:
            names = [t.get("name") or (t.get("function") or {}).get("name") for t in tools]  # plain or OpenAI-style
            missing = [n for n in names if not n or not found(str(n))]
            if missing:
                raise TemplateMismatch(
                    f"template {self.template.name!r} dropped the tool definitions ({', '.join(map(str, missing))}): "
                    "use chatml or llama3, or a template that renders `tools`"
                )
        if self.template.roles is not None:
            return
        for i, m in enumerate(messages):
            if m["content"].strip() and not found(m["content"]) and m.get("tool_calls"):
                raise TemplateMismatch(
                    f"template {self.template.name!r} renders the tool calls of message {i} but not the text beside "
                    "them (Llama 3.1's does this), so that text would be lost: move it to its own assistant turn, "
                    "or use chatml or llama3"
                )
            if m["content"].strip() and not found(m["content"]):
                raise TemplateMismatch(
                    f"template {self.template.name!r} dropped a {m['role']!r} message (message {i}): map that role "
                    "to one it renders with roles:, or use a built-in template"
                )
            calls = [c.get("function", c).get("name") for c in m.get("tool_calls") or []]
            if any(not found(str(name)) for name in calls):
                raise TemplateMismatch(
                    f"template {self.template.name!r} dropped the tool calls of message {i} "
                    f"({', '.join(map(str, calls))}): use chatml or llama3, or a template that renders tool_calls"
                )
