"""Prompt templates: how a conversation becomes the exact text the model is trained on.

Every template is a Jinja chat template, installed on the tokenizer and saved with it in the run
directory. So `qlora generate`, `qlora eval` and plain `tokenizer.apply_chat_template` all render
prompts exactly as training did: there is one renderer, not one for training and one for
inference.

    template = resolve_template("alpaca", tokenizer)   # or "chatml", "raw", "tokenizer", "my.jinja"
    apply_template(template, tokenizer)

Assistant content is wrapped in `{% generation %}` blocks. transformers turns those into an
assistant-token mask computed on the tokenization that is actually trained (not on separately
tokenized pieces), which is how the loss is restricted to responses. Each block ends with the
template's stop token (EOS, or <|im_end|> for ChatML), so the model learns to stop.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT
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

CHATML = (
    _BOS
    + "{%- for m in messages %}"
    + "{%- if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    + "{%- generation %}{{ m['content'] + '<|im_end|>' }}{%- endgeneration %}{{ '\\n' }}"
    + "{%- else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    + "{%- endif %}{%- endfor %}"
    + "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
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
    """A resolved template. `stop` is the token that ends an assistant turn (None = tokenizer EOS)."""

    name: str
    jinja: str
    stop: str | None = None


BUILTINS = {
    "alpaca": Template("alpaca", ALPACA),
    "chatml": Template("chatml", CHATML, stop="<|im_end|>"),
    "raw": Template("raw", RAW),
}

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def resolve_template(name: str, tokenizer, needs_masks: bool = True, where: str = "data.template") -> Template:
    """Find a template by name ('alpaca', 'chatml', 'raw', 'tokenizer') or .jinja path, and check it fits."""
    if name in BUILTINS:
        template = BUILTINS[name]
    elif name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError.single(where, "the tokenizer has no chat template: choose alpaca, chatml or raw")
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

    if needs_masks and not _GENERATION_TAG.search(template.jinja):
        raise UserError.single(
            where,
            f"template {template.name!r} has no {{% generation %}} block around assistant content, so response "
            "tokens cannot be told apart from prompt tokens. Add one, use a built-in template, "
            "or set data.train_on_inputs: true",
        )
    stop = template.stop or tokenizer.eos_token
    if stop is None:
        raise UserError.single(where, "the tokenizer has no EOS token, so the model could not learn to stop")
    if template.stop and len(tokenizer.encode(template.stop, add_special_tokens=False)) != 1:
        raise UserError.single(
            where,
            f"template {template.name!r} ends turns with {template.stop}, which is not a single token of this "
            "tokenizer, so generation could not stop on it. Use alpaca or raw, or a tokenizer with ChatML tokens",
        )
    return template


def apply_template(template: Template, tokenizer) -> None:
    """Install the template on the tokenizer, so it is used everywhere and saved with it.

    For templates with their own stop token (ChatML), that token becomes the tokenizer's EOS, so
    generation stops where training taught the model to stop.
    """
    tokenizer.chat_template = template.jinja
    if template.stop:
        tokenizer.eos_token = template.stop
