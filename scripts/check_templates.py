"""Check, row by row, that the tokens qlora trains are the assistant's tokens (issue 19).

    .venv/bin/python scripts/check_templates.py TOKENIZER_DIR DATA... [--format F] [--max-rows N]
        [--template tokenizer|NAME] [--roles NAME=ROLE,...] [--demo-tool-calls] [--quiet]

For every row of every data file, two answers are compared:

  - what qlora trains: the loss mask of qlora's own pipeline for that row (the pipeline's batch
    function, `_tokenize_rows`: to_canonical -> Renderer.render -> encode), with the tokenizer and
    the template a recipe with `data.template: tokenizer` (the default here) or NAME would install;
  - a reference that shares none of qlora's span logic: the conversation rendered by the
    tokenizer's own `apply_chat_template(messages, tokenize=False, tools=...)`, each assistant
    message's content found in that text (in order, after the messages before it), extended over
    the end-of-turn token(s) that follow it (<|im_end|>, <|eot_id|>, </s>, <|end|>, EOS, ...), and
    the text tokenized with offsets. A token should be trained when it covers part of such a span
    and nothing outside it but whitespace the template put right before the content (so
    SentencePiece's '▁Hello' after '[/INST] ' counts as the response's first token). An empty
    assistant message has nothing to train, not even its end-of-turn token.

Each row is reported as OK, MISMATCH (the tokens trained that are not assistant content, and the
assistant tokens not trained, as decoded text), REFUSED (qlora rejects the row: bad row, template
mismatch, unmapped role) or SKIPPED (qlora keeps no token of it), with qlora's reason. A summary per
file follows. Exit status 1 when any row mismatches, else 0.

The label at position 0 is left out of the comparison: it is never a target (each label is
predicted from the tokens before it), as `qlora data` counts trained tokens.

--demo-tool-calls adds scripts/data/openai_tool_calls.jsonl (OpenAI-style messages with tools and
tool_calls) to the files checked. --format is guessed from the first row when not given
(instruction -> alpaca, conversations -> sharegpt, messages -> messages, prompt -> prompt_completion).
ShareGPT's tool-call roles are mapped as a recipe would map them: function_call -> assistant,
observation -> tool (change with --roles).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_FILE = ROOT / "scripts" / "data" / "openai_tool_calls.jsonl"
DEFAULT_ROLES = {"function_call": "assistant", "observation": "tool"}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "</s>", "<|end|>", "<|endoftext|>", "<|end_of_text|>")
SHOW = 70  # characters of decoded text shown per run of tokens


@dataclass
class Result:
    status: str  # OK, MISMATCH, REFUSED, SKIPPED
    reason: str = ""
    details: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # kinds of mismatch, for the summary


# --- what qlora trains --------------------------------------------------------------------------


def load(tokenizer_dir: str, template_name: str):
    """The tokenizer and Renderer a recipe with this model and data.template would use (train.prepare_tokenizer)."""
    from qlora_cli.config import ModelSection
    from qlora_cli.data.templates import Renderer, apply_template, resolve_template
    from qlora_cli.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=tokenizer_dir))
    template = resolve_template(template_name, tokenizer)
    apply_template(template, tokenizer)
    return tokenizer, Renderer(template, tokenizer)


def qlora_row(row: dict, fmt: str, roles: dict, renderer, tokenizer) -> tuple[str, str, list[int], list[bool]]:
    """(status, reason, input_ids, trained per token) from the pipeline's own batch function, for one row."""
    from qlora_cli.data import pipeline
    from qlora_cli.data.formats import FIELDS
    from qlora_cli.data.sources import BAD_COLUMN, JSON_COLUMN, ROW_COLUMN

    batch = {ROW_COLUMN: [1], JSON_COLUMN: [json.dumps(row)], BAD_COLUMN: [None]}
    table = pipeline._tokenize_rows(
        batch, fmt=fmt, rename={f: f for f in FIELDS[fmt]}, roles=roles, renderer=renderer, tokenizer=tokenizer,
        train_on_inputs=False, max_len=1 << 30, on_too_long="truncate",
    )
    ids = table.column("input_ids")[0].as_py() or []
    labels = table.column("labels")[0].as_py() or []
    return (table.column("status")[0].as_py(), table.column("reason")[0].as_py(), ids,
            [label != pipeline.IGNORE_INDEX for label in labels])


# --- the reference ------------------------------------------------------------------------------


def reference(tokenizer, messages: list[dict], tools) -> tuple[list[int], list[bool], list[bool], list[str]]:
    """(ids, should-train per token, either-way per token, notes) from the template's own rendering, located by content."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, tools=tools)
    stops = [s for s in dict.fromkeys([*END_OF_TURN, tokenizer.eos_token]) if s]
    spans, notes, cursor = [], [], 0  # spans: (left allowance, content start, end with stop tokens)
    for i, m in enumerate(messages):
        # Stripped: templates may trim (Llama 3), and leading whitespace could match the template's own.
        # Whitespace before it is allowed into the first token below, up to the end of the prompt.
        content = m["content"].strip()
        if not content:
            if m["role"] == "assistant":
                notes.append(f"message {i} is an empty assistant turn: nothing in it is assistant content")
            continue
        at = text.find(content, cursor)
        if at < 0:
            if m["role"] == "assistant":
                notes.append(f"assistant message {i} is not in the template's rendering verbatim: {_short(content)}")
            continue
        end = cursor = at + len(content)
        if m["role"] != "assistant":
            continue
        while True:  # the end-of-turn token(s) right after the content
            k = end
            while k < len(text) and text[k].isspace():
                k += 1
            stop = next((s for s in stops if text.startswith(s, k)), None)
            if stop is None:
                break
            end = cursor = k + len(stop)
        # Whitespace right before the content may belong to the response's first token ('[/INST] Hello'
        # -> '▁Hello'), but not past the end of the prompt a generation would start from.
        floor = max(_prev_end(spans), _prompt_end(tokenizer, messages[:i], tools, text, at))
        left = at
        while left > floor and text[left - 1].isspace():
            left -= 1
        spans.append((left, at, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    should, neutral = [], []
    for s, e in enc["offset_mapping"]:
        should.append(e > s and any(e > start and s < end and s >= left for left, start, end in spans))
        # a token of nothing but the whitespace the template puts before the content: either way is fine
        neutral.append(e > s and any(s >= left and e <= start for left, start, end in spans) and not text[s:e].strip())
    return enc["input_ids"], should, neutral, notes


def _prompt_end(tokenizer, before: list[dict], tools, text: str, at: int) -> int:
    """Where the generation prompt for this turn ends in `text`, when its render is a prefix of it (else 0)."""
    if not before:
        return 0
    try:
        prompt = tokenizer.apply_chat_template(before, tokenize=False, add_generation_prompt=True, tools=tools)
    except Exception:  # noqa: BLE001 - e.g. a template that insists on alternating roles
        return 0
    return len(prompt) if len(prompt) <= at and text.startswith(prompt) else 0


def _prev_end(spans) -> int:
    return spans[-1][2] if spans else 0


# --- comparison ---------------------------------------------------------------------------------


def check_row(row: dict, fmt: str, roles: dict, renderer, tokenizer) -> Result:
    from qlora_cli.data.formats import BadRow, to_canonical

    status, reason, ids, trained = qlora_row(row, fmt, roles, renderer, tokenizer)
    if status in ("bad", "template", "role"):
        return Result("REFUSED", f"{status}: {reason}")
    if status != "ok":
        return Result("SKIPPED", f"{status}: {reason or 'no token carries a loss'}")
    try:
        example = to_canonical(row, fmt, roles)
        ref_ids, should, neutral, notes = reference(tokenizer, example["messages"], example.get("tools"))
    except BadRow as exc:  # qlora accepted what the converter refuses: cannot happen unless they drift apart
        return Result("MISMATCH", f"the row converts for qlora but not here: {exc}", kinds=["conversion"])
    except Exception as exc:  # noqa: BLE001 - the template's own apply_chat_template refused the row
        return Result("MISMATCH", f"qlora trains this row, but apply_chat_template fails on it: {exc}",
                      kinds=["reference fails"])
    dropped = [i for i, m in enumerate(row.get("messages") or []) if isinstance(m, dict) and m.get("tool_calls")]
    if dropped:
        notes.append(f"messages {dropped} have tool_calls, which the conversion drops")
    if ref_ids != ids:
        where = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), min(len(ids), len(ref_ids)))
        return Result("MISMATCH", "qlora's text differs from apply_chat_template's from token "
                      f"{where}: {_short(tokenizer.decode(ids[where:where + 20]))} vs "
                      f"{_short(tokenizer.decode(ref_ids[where:where + 20]))}", notes, ["rendered text differs"])
    details, kinds = [], []
    for a, b in _runs([t and not s and not x for t, s, x in zip(trained, should, neutral)]):
        if a == 0:
            a = 1  # position 0 is never a target
            if a == b:
                continue
        piece = tokenizer.decode(ids[a:b])
        details.append(f"trains {_short(piece)} ({_tokens(tokenizer, ids, a, b)}) that is not assistant content")
        kinds.append(_kind(piece, a, b, should, ids, tokenizer))
    for a, b in _runs([s and not t and not x for t, s, x in zip(trained, should, neutral)]):
        if a == 0 and b == 1:
            continue
        details.append(f"does not train {_short(tokenizer.decode(ids[a:b]))} ({_tokens(tokenizer, ids, a, b)}), "
                       "assistant content")
        kinds.append("assistant content not trained")
    if not details:
        return Result("OK")
    return Result("MISMATCH", "", details + [f"note: {n}" for n in notes], kinds)


def _kind(piece: str, a: int, b: int, should: list[bool], ids, tokenizer) -> str:
    if a <= 1:
        return "preamble trained (conversation starts with an assistant turn)"
    if "<think>" in piece:
        return "empty <think> block trained"
    if piece.strip() in END_OF_TURN or piece.strip() == tokenizer.eos_token:
        return "end-of-turn of an empty assistant turn trained"
    if b - a == 1 and b < len(should) and should[b]:
        return "boundary token merging prompt end and response start trained"
    return "prompt text trained"


def _tokens(tokenizer, ids, a: int, b: int) -> str:
    where = f"token {a}" if b - a == 1 else f"tokens {a}-{b - 1}"
    return f"{where}: {tokenizer.convert_ids_to_tokens(ids[a:b])}" if b - a <= 3 else where


def _runs(flags: list[bool]):
    """(start, end) of each run of True."""
    start = None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            yield start, i
            start = None


def _short(text: str) -> str:
    return repr(text if len(text) <= SHOW else text[: SHOW - 25] + "..." + text[-22:])


# --- files --------------------------------------------------------------------------------------


def read_rows(path: Path, max_rows: int | None) -> list:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows[:max_rows] if max_rows else rows


def guess_format(row) -> str:
    for key, fmt in (("instruction", "alpaca"), ("conversations", "sharegpt"), ("messages", "messages"),
                     ("prompt", "prompt_completion")):
        if isinstance(row, dict) and key in row:
            return fmt
    raise SystemExit(f"cannot guess the format of {row!r:.80}: pass --format")


def check_file(path: Path, args, renderer, tokenizer, out) -> Counter:
    rows = read_rows(path, args.max_rows)
    fmt = args.format or guess_format(rows[0] if rows else {})
    roles = dict(DEFAULT_ROLES) if fmt == "sharegpt" else {}
    roles.update(args.roles)
    counts, kinds, reasons = Counter(), Counter(), Counter()
    print(f"== {path} ({fmt}, {len(rows)} rows)", file=out)
    for n, row in enumerate(rows, 1):
        result = check_row(row, fmt, roles, renderer, tokenizer) if isinstance(row, dict) else Result(
            "REFUSED", "not a JSON object")
        counts[result.status] += 1
        kinds.update(dict.fromkeys(result.kinds, 1))
        if result.status in ("REFUSED", "SKIPPED"):
            reasons[result.reason if len(result.reason) <= 110 else result.reason[:107] + "..."] += 1
        if args.quiet and result.status == "OK":
            continue
        print(f"  row {n}: {result.status}" + (f": {result.reason}" if result.reason else ""), file=out)
        for line in result.details:
            print(f"      {line}", file=out)
    print(f"-- {path.name}: {counts['OK']} OK, {counts['MISMATCH']} mismatched, {counts['REFUSED']} refused, "
          f"{counts['SKIPPED']} skipped (of {len(rows)})", file=out)
    for kind, k in kinds.most_common():
        print(f"     mismatch: {kind}: {k} rows", file=out)
    for reason, k in reasons.most_common(3):
        print(f"     refused/skipped: {k} x {reason!r}", file=out)
    return counts


def parse_roles(text: str) -> dict:
    try:
        return dict(pair.split("=", 1) for pair in text.split(",") if pair)
    except ValueError:
        raise argparse.ArgumentTypeError("expected NAME=ROLE,NAME=ROLE") from None


def main(argv=None, out=sys.stdout) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="a folder (or hub id) AutoTokenizer loads")
    parser.add_argument("data", nargs="*", type=Path, help="data files (.json arrays or .jsonl)")
    parser.add_argument("--format", choices=["alpaca", "sharegpt", "messages", "prompt_completion"])
    parser.add_argument("--max-rows", type=int, default=None, help="check only the first N rows of each file")
    parser.add_argument("--template", default="tokenizer", help="tokenizer (the default), a built-in name or .jinja")
    parser.add_argument("--roles", type=parse_roles, default={}, help="extra role mapping, NAME=ROLE,...")
    parser.add_argument("--demo-tool-calls", action="store_true", help=f"also check {DEMO_FILE.relative_to(ROOT)}")
    parser.add_argument("--quiet", action="store_true", help="print only the rows that are not OK")
    args = parser.parse_args(argv)
    files = list(args.data) + ([DEMO_FILE] if args.demo_tool_calls else [])
    if not files:
        parser.error("no data files (give DATA or --demo-tool-calls)")
    tokenizer, renderer = load(args.tokenizer, args.template)
    print(f"tokenizer {args.tokenizer}, template {args.template}", file=out)
    total = Counter()
    for path in files:
        total += check_file(path, args, renderer, tokenizer, out)
    print(f"== total: {total['OK']} OK, {total['MISMATCH']} mismatched, {total['REFUSED']} refused, "
          f"{total['SKIPPED']} skipped", file=out)
    return 1 if total["MISMATCH"] else 0


if __name__ == "__main__":
    sys.exit(main())
