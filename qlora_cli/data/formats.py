"""Row formats -> one canonical form.

Every supported layout becomes either a conversation or plain text:

    to_canonical({"instruction": "Add 2 and 3", "input": "", "output": "5"}, "alpaca")
    # -> {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": "5"}]}
    to_canonical({"text": "Once upon a time"}, "text")
    # -> {"text": "Once upon a time"}

Conversations are rendered later by a template (templates.py); keeping one canonical form means
masking, rendering at inference and statistics are written once, not once per format.
A row that does not fit its format raises `BadRow` with the reason; the pipeline adds the file
and row number. A tool-call role (function_call, observation, ...) that the recipe has not mapped
raises `UnmappedRole` instead: that is a recipe problem, not a row problem, and it always stops the
run, because skipping those rows would silently drop every tool call in the data.
"""

from __future__ import annotations

import difflib
import json

from qlora_cli.data.sources import MAX_JSON_DEPTH, deep_json_lines

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

ROLES = ("system", "user", "assistant", "tool")

# Role names understood without a `roles:` mapping. ShareGPT's human/gpt are its standard names.
KNOWN_ROLES = {
    "sharegpt": {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
    "messages": {r: r for r in ROLES},
}

# Role names that carry tool calls or tool results in common datasets (Glaive, ToolACE, xLAM,
# OpenAI). Which canonical role they should become depends on the template and on whether the
# calls should be trained, so the recipe must say (`roles:`); they are never guessed or dropped.
TOOL_ROLE_NAMES = {
    "function_call", "function", "function_response", "observation", "tool", "tool_call", "tool_calls",
    "tool_response", "tool_result", "tool_output", "ipython", "api", "plugin",
}

# The fields each format reads, in the names used by `columns:` in a recipe.
FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "sharegpt": ("conversations", "tools"),
    "messages": ("messages", "tools"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
OPTIONAL_FIELDS = {"input", "tools"}


class BadRow(ValueError):
    """A row that does not fit its declared format."""


class UnmappedRole(BadRow):
    """Tool-call role names the recipe has not mapped to canonical roles (all of them in the row)."""

    def __init__(self, roles: list[str]):
        super().__init__(f"roles {', '.join(map(repr, roles))} are not mapped to one of {', '.join(ROLES)}")
        self.roles = roles


def to_canonical(row: dict, fmt: str, roles: dict[str, str] | None = None) -> dict:
    """Convert one row (already column-mapped) to {"messages": [...]} or {"text": str}.

    `roles` maps role names found in sharegpt/messages data to canonical roles, on top of KNOWN_ROLES.
    """
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
    if fmt in ("sharegpt", "messages"):
        field, role_key, content_key = ("conversations", "from", "value") if fmt == "sharegpt" else (
            "messages", "role", "content")
        out = {"messages": _turns(row, field, role_key, content_key, {**KNOWN_ROLES[fmt], **(roles or {})})}
        tools = _tools(row.get("tools"))
        return {**out, "tools": tools} if tools else out
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


def _tools(value) -> list[dict] | None:
    """Tool definitions (JSON schemas) offered to the model: a list, or its JSON text (Glaive stores text)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        # Bounded before parsing, as whole files are (sources.py): json.loads raises RecursionError
        # past about 1,000 levels, and a tool schema nests a few.
        if deep_json_lines(value.encode("utf-8", "surrogatepass"), one_value=True):
            raise BadRow(f"field 'tools' is nested more than {MAX_JSON_DEPTH} levels deep (tool schemas nest a few)")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRow(f"field 'tools' is not valid JSON: {exc.msg} at character {exc.pos + 1}") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise BadRow("field 'tools' must be a list of tool definitions (JSON objects)")
    return value or None


def _turns(row: dict, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    """A conversation as canonical messages; `roles` maps the data's role names to ROLES.

    OpenAI's chat format is kept whole: an assistant turn's `tool_calls` (its content may then be null
    or empty), and a tool turn's `tool_call_id` and `name`. Templates render them (the model's own
    through apply_chat_template, the built-ins in their family's layout), and the calls are trained.
    """
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"field '{field}' must be a non-empty list of {{{role_key}, {content_key}}}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and "tool_calls" not in turn):
            raise BadRow(f"{field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        if not isinstance(turn[role_key], str):
            raise BadRow(f"{field}[{i}].{role_key} must be a string, got {type(turn[role_key]).__name__}")
    # Case-insensitive: Function_Call is as much a tool call as function_call.
    unmapped = sorted({
        t[role_key] for t in turns if t[role_key] not in roles and t[role_key].lower() in TOOL_ROLE_NAMES
    })
    if unmapped:
        raise UnmappedRole(unmapped)
    out = []
    for i, turn in enumerate(turns):
        name, content = turn[role_key], turn.get(content_key)
        if name not in roles:
            known = ", ".join(sorted(roles))
            near = difflib.get_close_matches(name, sorted(roles), n=1)
            hint = f": did you mean {near[0]!r}?" if near else "."
            meant = roles[near[0]] if near else "user"
            raise BadRow(f"{field}[{i}] has unknown role {name!r}{hint} Expected one of {known}, or map it with "
                         f"the source's roles:, e.g. roles: {{{name}: {meant}}}")
        message = _msg(roles[name], "")
        calls = turn.get("tool_calls")
        if calls not in (None, []):
            if message["role"] != "assistant":
                raise BadRow(f"{field}[{i}] has tool_calls but its role is {message['role']!r}: only an assistant "
                             "turn makes tool calls")
            message["tool_calls"] = [_tool_call(call, f"{field}[{i}].tool_calls[{j}]") for j, call in enumerate(
                calls if isinstance(calls, list) else [calls])]
        if content is None and "tool_calls" in message:
            content = ""  # OpenAI writes null content beside tool calls
        if not isinstance(content, str):
            raise BadRow(f"{field}[{i}].{content_key} must be a string, got {type(content).__name__}")
        message["content"] = content
        for key in ("tool_call_id", "name"):  # which call a tool result answers
            if message["role"] == "tool" and isinstance(turn.get(key), str):
                message[key] = turn[key]
        out.append(message)
    if not any(m["role"] == "assistant" and (m["content"] or m.get("tool_calls")) for m in out):
        raise BadRow("the conversation has no non-empty assistant turn, so there is nothing to train on")
    return out


def _tool_call(call, where: str) -> dict:
    """One OpenAI tool call, {"id", "type": "function", "function": {"name", "arguments"}}, with its
    arguments as an object: OpenAI stores them as JSON text, and chat templates (and transformers'
    documentation) expect a mapping they render with `tojson`; a string would be quoted twice."""
    if not isinstance(call, dict):
        raise BadRow(f"{where} must be an object with a 'function' (name and arguments)")
    function = call.get("function", call)  # {"name", "arguments"} without the wrapper is common too
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRow(f"{where} has no function name: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        if deep_json_lines(arguments.encode("utf-8", "surrogatepass"), one_value=True):
            raise BadRow(f"{where}.arguments is nested more than {MAX_JSON_DEPTH} levels deep")
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise BadRow(f"{where}.arguments is not valid JSON: {exc.msg} at character {exc.pos + 1}") from None
    if not isinstance(arguments, dict):
        raise BadRow(f"{where}.arguments must be a JSON object, got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out
