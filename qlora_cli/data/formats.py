"""Row formats -> one canonical form.

Every supported layout becomes either a conversation or plain text:

    to_canonical({"instruction": "Add 2 and 3", "input": "", "output": "5"}, "alpaca")
    # -> {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": "5"}]}
    to_canonical({"text": "Once upon a time"}, "text")
    # -> {"text": "Once upon a time"}

Conversations are rendered later by a template (templates.py); keeping one canonical form means
masking, rendering at inference and statistics are written once, not once per format.
A row that does not fit its format raises `BadRow` with the reason; the pipeline adds the file
and row number.
"""

from __future__ import annotations

# The two Alpaca preambles, verbatim from Stanford Alpaca. The "with input" variant is chosen
# per row; the alpaca template falls back to the "no input" one when a conversation has no
# system message (e.g. a prompt typed into `qlora generate`).
ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

ROLES = ("system", "user", "assistant")

# The fields each format reads, in the names used by `columns:` in a recipe.
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_FIELDS = {"input"}


class BadRow(ValueError):
    """A row that does not fit its declared format."""


def to_canonical(row: dict, fmt: str) -> dict:
    """Convert one row (already column-mapped) to {"messages": [...]} or {"text": str}."""
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = _string(row, "input", required=False)
        output = _string(row, "output")
        if extra:
            system, user = ALPACA_SYSTEM_WITH_INPUT, f"{instruction}\n\n### Input:\n{extra}"
        else:
            system, user = ALPACA_SYSTEM_NO_INPUT, instruction
        return {"messages": [_msg("system", system), _msg("user", user), _msg("assistant", output)]}
    if fmt == "prompt_completion":
        return {"messages": [_msg("user", _string(row, "prompt")), _msg("assistant", _string(row, "completion"))]}
    if fmt == "messages":
        return {"messages": _messages(row)}
    if fmt == "text":
        return {"text": _string(row, "text")}
    raise ValueError(f"unknown format {fmt!r}")  # the schema makes this unreachable


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _string(row: dict, field: str, required: bool = True) -> str:
    value = row.get(field)
    if value is None or value == "":
        if required:
            raise BadRow(f"field '{field}' is missing or empty")
        return ""
    if not isinstance(value, str):
        raise BadRow(f"field '{field}' must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRow("field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise BadRow(f"messages[{i}] has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRow(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append(_msg(role, content))
    if not any(m["role"] == "assistant" and m["content"] for m in out):
        raise BadRow("the conversation has no non-empty assistant turn, so there is nothing to train on")
    return out
