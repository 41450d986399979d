"""Reading a recipe: a YAML file plus `--set` overrides become one validated `Recipe`.

    recipe = load_recipe("configs/tiny.yaml", overrides=["lora.r=8", "train.max_steps=20"])
    recipe.lora.r            # 8, typed
    recipe.to_yaml()         # the fully resolved recipe, defaults included

Precedence is explicit: schema default < YAML < `--set`, and validation happens once, on the
merged result. Every problem is collected and reported at once, each with its dotted key, the
YAML line it sits on, and what to do (`UserError`, exit 2). Unknown keys are rejected with a
near-match suggestion, because a silently ignored typo (`lora.alpah: 64`) is the single most
common way a fine-tuning run quietly does the wrong thing.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from qlora_cli.errors import Problem, UserError
from qlora_cli.recipe.schema import _WHY_AT_MOST, RULES, Recipe

# ---------------------------------------------------------------------------------------------
# Loading: YAML (with line numbers) -> overrides -> one validation.


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises `UserError` listing every problem found."""
    path = Path(path)
    data, lines = _read_yaml(path)
    overridden = _apply_overrides(data, overrides)
    return validate_recipe(data, lines, overridden)


def validate_recipe(data: dict, lines: dict[tuple, int] | None = None, overridden: set[tuple] = frozenset()) -> Recipe:
    """Validate a recipe mapping; `lines` maps key paths to YAML lines for the messages."""
    lines = lines or {}

    def locate(loc: tuple) -> tuple[str, int | None]:
        where = _dotted(loc)
        if any(loc[:i] in overridden for i in range(1, len(loc) + 1)):
            return where + " (from --set)", None
        for i in range(len(loc), 0, -1):  # the deepest key that exists in the file
            if loc[:i] in lines:
                return where, lines[loc[:i]]
        return where, None

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems, seen = [], set()
        for err in sorted(exc.errors(), key=lambda e: e["type"] != "literal_error"):
            loc = tuple(err["loc"])
            # Pydantic reports union members as extra loc parts ("list[str]", "literal[...]");
            # drop them, they are not keys the user wrote. One message per key: for a union,
            # the literal choice ("must be one of 'all-linear'") is the most useful one.
            loc = tuple(p for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]"))
            if loc in seen:
                continue
            seen.add(loc)
            where, line = locate(loc)
            problems.append(Problem(where, _message(err, loc, where.endswith("(from --set)")), line))
        problems.sort(key=lambda p: p.line if p.line is not None else float("inf"))  # file order
        raise UserError(problems, header="The recipe has problems:") from None

    problems = []
    for rule in RULES:
        for p in rule(recipe):
            where, line = locate(tuple(_parse_key(p.where)))
            problems.append(Problem(where, p.message, line))
    if problems:
        raise UserError(problems, header="The recipe has problems:")
    return recipe


def _message(err: dict, loc: tuple, from_set: bool = False) -> str:
    """Turn a pydantic error into a sentence that says what to do."""
    kind = err["type"]
    if kind == "model_type" and _model_at(loc) is not None:  # a value where a section belongs (lora: 5)
        return _section_not_value(_model_at(loc), _dotted(loc), err.get("input"), from_set)
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        key = str(loc[-1])
        known = list(parent.model_fields) if parent else []
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{near[0]}'?" if near else f"valid keys here: {', '.join(known)}"
        return f"unknown key — {hint}"
    if kind == "missing":
        field = _field_at(loc)
        desc = f" ({field.description})" if field is not None and field.description else ""
        return f"required key is missing{desc}"
    if kind == "literal_error":
        return f"{err['msg'].replace('Input should be', 'must be one of')}; got {err['input']!r}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    if kind == "too_short":
        return f"needs at least {err.get('ctx', {}).get('min_length', 1)} entry; got an empty list"
    if err.get("input", "") is None and not kind.startswith("none"):
        field = _field_at(loc)
        if field is None or field.is_required():
            return "has no value: give one"
        default = "" if field.default is PydanticUndefined else f" ({field.default!r})"
        return f"has no value: give one, or remove the key to use the default{default}"
    if kind == "less_than_equal":
        why = _WHY_AT_MOST.get((_model_at(loc[:-1]), loc[-1]))
        if why is not None:
            return f"must be at most {_readable(err['ctx']['le'])}; got {err['input']!r}. {why}"
    # Type and range errors: "must be greater than 0; got -1".
    return f"{err['msg'].replace('Input should be', 'must be')}; got {err.get('input')!r}"


def _section_not_value(section: type[BaseModel], dotted: str, given, from_set: bool) -> str:
    """`lora: 5` or `--set lora=5`: say that it is a section, and how to set a key inside it."""
    keys = list(section.model_fields)
    fields = section.model_fields.items()
    key, value = next(((k, "...") for k, f in fields if f.is_required()), None) or next(
        ((k, f.default) for k, f in fields if isinstance(f.default, (bool, int, float, str)) and f.default != ""),
        (keys[0], "..."))
    value = str(value).lower() if isinstance(value, bool) else value
    if from_set:
        example = f"--set {dotted}.{key}={value}"
    elif dotted.endswith("]"):  # an item of a list of sections
        example = f"- {{{key}: {value}}}"
    else:
        example = f"{dotted.rsplit('.', 1)[-1]}: {{{key}: {value}}}"
    return (f"is a section, not a value (got {given!r}): set one of its keys, e.g. {example} "
            f"(its keys: {', '.join(keys)})")


def _readable(number) -> str:
    """1048576 -> '1,048,576'; 1000.0 -> '1,000'."""
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    return f"{number:,}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that the key path `loc` points into (None if it is not a section)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _section_type(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_at(loc: tuple):
    parent = _model_at(loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent is not None else None


def _section_type(annotation):
    """Unwrap list[X] / X | None to the section class X, if any."""
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


def _parse_key(dotted: str) -> list:
    """'data.sources[0].path' -> ['data', 'sources', 0, 'path']"""
    parts: list = []
    for i, chunk in enumerate(dotted.split(".")):
        name, *idx = chunk.replace("]", "").split("[")
        if name:
            parts.append(name)
        elif i > 0 or not idx:  # 'lora..r' or '.r': an empty key
            raise ValueError(f"empty key in {dotted!r}")
        indices = [int(j) for j in idx]
        if any(j < 0 for j in indices):
            raise ValueError(f"negative index in {dotted!r}")
        parts += indices
    return parts


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """Parse the recipe safely and record the line of every key, for error messages."""
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise UserError.single(str(path), f"cannot read recipe: {hint}. Pass the path of a .yaml recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError.single(str(path), "is not a text file: a recipe is UTF-8 YAML") from None
    try:
        data, lines, duplicates = _parse_yaml(text)
    except YamlAliasError as exc:
        raise UserError.single(f"{path}:{exc.mark.line + 1}", exc.message) from None
    except RecursionError:  # the composer recurses once per level; recursive aliases are caught above
        raise UserError.single(str(path), "is nested too deeply to read (hundreds of levels of brackets or "
                               "indentation): a recipe is a few levels deep, so check its brackets") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError.single(where, f"invalid YAML: {problem}. Check indentation and quoting") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a value of type {type(data).__name__}"
        raise UserError.single(str(path), f"a recipe must be a mapping of sections (model:, data:, ...); this is {kind}")
    if duplicates:  # PyYAML silently keeps the last of two equal keys; that hides edits
        raise UserError(duplicates, header="The recipe has problems:")
    return data, lines


# ---------------------------------------------------------------------------------------------
# Aliases. YAML lets `*name` stand for a whole anchored value, and an anchor may itself hold
# aliases, so nine short lines can stand for 10^9 values ("billion laughs"). PyYAML shares one
# object per anchor, which stays small, but everything after it walks the expanded tree: the line
# map below, pydantic, the error messages. A recipe is a few hundred values, and reusing a list or
# a column mapping a few times adds tens, so what aliases add to one document is bounded, and
# counted while composing, before any of that walks it.

MAX_ALIAS_EXPANSION = 10_000  # values that aliases may add to one YAML document


class YamlAliasError(Exception):
    """An alias bomb or a recursive alias, at `mark` (a PyYAML position)."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark = mark
        self.message = message


class _BoundedAliasLoader(yaml.SafeLoader):
    """SafeLoader that counts the values aliases expand to, and refuses an alias bomb or an alias
    used inside its own anchor, at the alias that does it."""

    def __init__(self, text: str):
        super().__init__(text)
        self.expanded = 0  # values added by the aliases composed so far
        self._sizes: dict[int, int] = {}  # id(node) -> values in its full expansion (nodes are kept alive)
        self._open: set[str] = set()  # anchors whose value is still being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                # PyYAML builds a cyclic structure that every later walk recurses into forever.
                raise YamlAliasError(event.start_mark, f"the alias *{event.anchor} is used inside its own anchor "
                                     f"&{event.anchor}, so it refers to itself and never ends: remove it")
            if event.anchor in self.anchors:  # else PyYAML reports the undefined alias
                self.expanded += self._size(self.anchors[event.anchor])
                if self.expanded > MAX_ALIAS_EXPANSION:
                    raise YamlAliasError(event.start_mark, (
                        f"YAML aliases expand to more than {MAX_ALIAS_EXPANSION:,} values (aliases of "
                        "anchors that hold aliases multiply: an alias bomb). A recipe needs a few hundred: write "
                        "the values out, or reuse anchors less"))
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is None:
            return super().compose_node(parent, index)
        self._open.add(anchor)  # PyYAML refuses a duplicate anchor, so names are unique
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.discard(anchor)

    def _size(self, node) -> int:
        """Values in the full expansion of `node`, itself included; memoized, as anchors share nodes."""
        size = self._sizes.get(id(node))
        if size is None:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(key) + self._size(value) for key, value in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(item) for item in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return size


def _parse_yaml(text: str) -> tuple[Any, dict[tuple, int], list[Problem]]:
    """Parse a YAML document once: its Python value, the line of every key path, and the keys
    written twice in one mapping.

    Raises YamlAliasError for an alias bomb or a recursive alias, and yaml.YAMLError for bad YAML.
    The value is a tree: a value reused through an alias is copied, so that `--set` on one key path
    changes that path only, not every place the anchor was used.
    """
    loader = _BoundedAliasLoader(text)
    try:
        node = loader.get_single_node()
        # Lines before constructing: construction merges `<<: *anchor` keys into the mapping node
        # in place, which would make a key that overrides a merged one look written twice.
        lines: dict[tuple, int] = {}
        duplicates: list[Problem] = []
        _collect_lines(node, (), lines, duplicates)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return _unshared(data), lines, duplicates


def _unshared(value):
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _collect_lines(node, prefix: tuple, out: dict, duplicates: list) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            line = key.start_mark.line + 1
            if path in out:
                duplicates.append(Problem(_dotted(path), f"appears twice (also on line {out[path]}): keep one", line))
            out[path] = line
            _collect_lines(value, path, out, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _collect_lines(item, prefix + (i,), out, duplicates)


def _apply_overrides(data: dict, overrides) -> set[tuple]:
    """Apply `--set a.b.c=value` in order. Values are parsed as YAML: 8 -> int, true -> bool, [a, b] -> list."""
    touched: set[tuple] = set()
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE with a dotted key, e.g. lora.r=8"))
            continue
        try:
            path = _parse_key(key.strip())
            value = _parse_yaml(raw)[0] if raw.strip() else None  # a value's own lines do not matter
        except YamlAliasError as exc:
            problems.append(Problem(f"--set {item}", exc.message))
            continue
        except (ValueError, yaml.YAMLError, RecursionError):
            problems.append(Problem(f"--set {item}", "could not parse; expected e.g. data.sources[0].path=x.jsonl"))
            continue
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path[: i + 1]))} does not exist"))
                    break
                node = node[part]
                continue
            if not isinstance(node, dict):
                problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path[:i]))} is not a section"))
                break
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        else:
            last = path[-1]
            if isinstance(last, int):
                if isinstance(node, list) and last < len(node):
                    node[last] = value
                else:
                    problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path))} does not exist"))
                    continue
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path[:-1]))} is not a section"))
                continue
            touched.add(tuple(path))
    if problems:
        raise UserError(problems, header="Bad --set overrides:")
    return touched
