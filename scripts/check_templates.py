"""Check, row by row, that the tokens qlora trains are the assistant's tokens (issue 19).

    .venv/bin/python scripts/check_templates.py TOKENIZER_DIR DATA... [--format F] [--max-rows N]
        [--template tokenizer|NAME] [--roles NAME=ROLE,...] [--demo-tool-calls] [--quiet]

For every row of every data file, two answers are compared:

  - what qlora trains: the input ids and loss mask of every example qlora's own pipeline makes of
    that row (the pipeline's batch function, `_tokenize_rows`: to_canonical -> Renderer.examples ->
    encode), with the tokenizer and the template a recipe with `data.template: tokenizer` (the
    default here) or NAME would install;
  - a reference that shares none of qlora's span logic, built from the tokenizer's own
    `apply_chat_template(messages, tokenize=False, tools=...)` (on the messages to_canonical gives,
    with a system message folded into the first user turn, as qlora does, when the template has no
    system role). In a rendering, message by message in order (each looked for after the one before):
      * an assistant turn's content (stripped: templates may trim) is found in the text, after the
        end of its generation prompt (`apply_chat_template(messages[:i], add_generation_prompt=True,
        tools=...)`, used only when that text is a prefix of the rendering). The turn is trained from
        the content through the end-of-turn marker(s) right after it (<|im_end|>, <|eot_id|>, </s>,
        <|end|>, EOS, ...; a run of them, whitespace between allowed); when it has tool calls, through
        the first end-of-turn marker(s) after the content instead (the calls come between);
      * an assistant turn with tool calls whose content is empty (or not in the text verbatim) is
        trained from the end of its generation prompt through the first end-of-turn marker(s) after
        it; without such a prompt it is not located (a note);
      * text between the generation prompt's end and the content that is not only whitespace and holds
        no other message's content (Qwen3's empty '<think>\\n\\n</think>\\n\\n' before the last reply) is
        what the model must generate at inference, so the turn is trained from the prompt's end (a note
        says so);
      * otherwise whitespace the template puts right before the content, back to the end of the
        generation prompt or of the previous assistant turn, may go either way (so SentencePiece's
        '▁Hello' after '[/INST] ' counts as the response's first token, and a token of only that
        whitespace is not counted for or against);
      * an assistant turn with neither content nor tool calls trains nothing, not even its end-of-turn
        marker; one whose content (without tool calls) is not in the text verbatim trains nothing (a
        note).
    The examples: the whole conversation's rendering, training the turns it writes as they are
    written when the conversation ends with them; and for each assistant turn it writes differently
    (Qwen3 drops the empty <think> block of earlier turns) an example of its own, the rendering of
    messages[:i+1] up to the end of that turn's marker(s), training only that turn. A turn is
    written the same when it is located at the same place in both renderings and both texts agree up
    to the end of its marker(s) in the whole rendering (Phi-3's EOS after the very last turn is not
    part of a turn that another follows). The whole conversation is an example unless it trains no
    turn and others do. Each text is tokenized with offsets: a token should be trained when it
    covers part of a trained span and starts in it or in the allowed whitespace before it.

qlora's examples are matched to the reference's (same ids, else the same decoded text, else one is
a prefix of the other, else the same position), and compared:

  - when the ids are the same: token by token (the trained tokens that should not be, the tokens
    that should be trained and are not, as decoded text);
  - when they differ, which qlora's seam policy does where a token of the whole text would straddle
    the start of a reply (Qwen's 'assistant\\n' + '\\n\\nRain' tokenizes as 'ĊĊĊ' in the whole text;
    qlora tokenizes the prompt alone and the reply after it): the example is OK, with a note
    "seam: prompt and reply tokenized apart at token N" (N: the first trained token from the first
    difference), when (a) both decode to the same text (`decode(ids, skip_special_tokens=False,
    clean_up_tokenization_spaces=False)`; else the kind is "rendered text differs"), (b) qlora's ids
    start with `tokenizer(prompt, add_special_tokens=False).input_ids`, for the generation prompt of
    the example's last assistant turn with a reply (the prompt `qlora generate` feeds; checked when it
    is a prefix of the rendering and that turn is trained in the example), and (c) the text of each
    run of tokens qlora trains (decoded as the difference of decoding the ids up to its end and up to
    its start) equals the text of the reference's trained spans, run by run, surrounding whitespace
    stripped. Else it is a MISMATCH of kind "seam".

Each row is reported as OK, MISMATCH (what differs, per example when it has several), REFUSED (qlora
rejects the row: bad row, template mismatch, unmapped role) or SKIPPED (qlora keeps no token of it),
with qlora's reason, and "(N examples)" when qlora makes several of it. A summary per file follows,
with the kinds of mismatch and of note. A file of plain text rows ({"text": ...}, trained whole with
no template) is reported as skipped rows ("plain text: no template"). Exit status 1 when any row
mismatches, else 0.

The label at position 0 is left out of the comparison: it is never a target (each label is
predicted from the tokens before it), as `qlora data` counts trained tokens.

--demo-tool-calls adds scripts/data/openai_tool_calls.jsonl (OpenAI-style messages with tools and
tool_calls) to the files checked. --format is guessed from the first row when not given
(instruction -> alpaca, conversations -> sharegpt, messages -> messages, prompt -> prompt_completion,
text -> plain text). ShareGPT's tool-call roles are mapped as a recipe would map them:
function_call -> assistant, observation -> tool (change with --roles).
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
PLAIN_TEXT = "plain text: no template"
NOTE_GAP = "template text between the generation prompt and the reply trained"
NOTE_SEAM = "seam: prompt and reply tokenized apart"


@dataclass
class Result:
    status: str  # OK, MISMATCH, REFUSED, SKIPPED
    reason: str = ""
    details: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # kinds of mismatch, for the summary
    notes: list[str] = field(default_factory=list)
    note_kinds: list[str] = field(default_factory=list)  # kinds of note, for the summary
    examples: int = 1


# --- what qlora trains --------------------------------------------------------------------------


def load(tokenizer_dir: str, template_name: str):
    """The tokenizer and Renderer a recipe with this model and data.template would use (train.prepare_tokenizer)."""
    from qlora_cli.recipe.schema import ModelSection
    from qlora_cli.data.templates import Renderer, apply_template, resolve_template
    from qlora_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=tokenizer_dir))
    template = resolve_template(template_name, tokenizer)
    apply_template(template, tokenizer)
    return tokenizer, Renderer(template, tokenizer)


def qlora_examples(row: dict, fmt: str, roles: dict, renderer, tokenizer) -> list[tuple[str, str, list, list]]:
    """[(status, reason, input_ids, trained per token), ...]: every output the pipeline's own batch function
    makes of one row (one per example; a refused row is one output with no tokens)."""
    from qlora_cli.data import pipeline
    from qlora_cli.data.formats import FIELDS
    from qlora_cli.data.sources import BAD_COLUMN, JSON_COLUMN, ROW_COLUMN

    batch = {ROW_COLUMN: [1], JSON_COLUMN: [json.dumps(row)], BAD_COLUMN: [None]}
    table = pipeline._tokenize_rows(
        batch, fmt=fmt, rename={f: f for f in FIELDS[fmt]}, roles=roles, renderer=renderer, tokenizer=tokenizer,
        train_on_inputs=False, max_seq_len=1 << 30, on_too_long="truncate",
    )
    out = []
    for status, reason, ids, labels in zip(*(table.column(c).to_pylist() for c in (
            "status", "reason", "input_ids", "labels"))):
        out.append((status, reason, ids or [], [label != pipeline.IGNORE_INDEX for label in labels or []]))
    return out


# --- the reference ------------------------------------------------------------------------------


@dataclass
class Span:
    """Where an assistant turn is trained in a rendering (characters)."""

    left: int  # whitespace from here up to `start` may go either way
    start: int  # trained from here ...
    end: int  # ... to here (through its end-of-turn marker(s))
    prompt: str | None  # its generation prompt, when that is a prefix of the rendering
    note: str = ""


@dataclass
class RefExample:
    text: str
    spans: list[Span]
    prompt: str | None  # the generation prompt of its last assistant turn (check b), when a prefix
    ids: list[int] = field(default_factory=list)
    should: list[bool] = field(default_factory=list)  # per token: should be trained
    neutral: list[bool] = field(default_factory=list)  # per token: either way is fine
    name: str = "the whole conversation"


def render(tokenizer, messages: list[dict], tools, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, tools=tools,
                                         add_generation_prompt=add_generation_prompt)


def reference(tokenizer, messages: list[dict], tools) -> tuple[list[RefExample], list[str]]:
    """(examples, notes about turns no example trains) from the template's own renderings, located by content."""
    full = render(tokenizer, messages, tools)
    spans, notes = locate(tokenizer, messages, tools, full)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and _has_reply(m)]
    in_full, alone = [], []
    for i in replies:
        there = spans.get(i)
        if i == len(messages) - 1:
            if there:
                in_full.append(i)
            continue
        text = render(tokenizer, messages[: i + 1], tools)
        own = locate(tokenizer, messages[: i + 1], tools, text)[0].get(i)
        if own is None or (there is not None and (there.left, there.start) == (own.left, own.start)
                           and full[: there.end] == text[: there.end]):
            if there:
                in_full.append(i)
            continue
        notes.pop(i, None)
        alone.append(RefExample(text[: own.end], [own], own.prompt, name=f"messages[:{i + 1}]"))
    examples = []
    if in_full or not alone:
        last = replies[-1] if replies else None
        examples.append(RefExample(full, [spans[i] for i in in_full], spans[last].prompt if last in in_full else None))
    examples += alone
    examples = [part for example in examples for part in _one_per_reply_if_history_straddles(tokenizer, example)]
    for example in examples:
        _tokenize(tokenizer, example)
    return examples, list(notes.values())


def _one_per_reply_if_history_straddles(tokenizer, example: RefExample) -> list[RefExample]:
    """Where a token of the whole text straddles the end of the generation prompt of a reply that another
    reply follows, no single sequence gives both replies their own prompt's tokens (the later prompt holds
    that token whole): then each reply is its own example, ending with it (the README's seam policy)."""
    if len(example.spans) < 2:
        return [example]
    offsets = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cuts = [len(sp.prompt) for sp in example.spans[:-1] if sp.prompt is not None]
    if not any(s < cut < e for cut in cuts for s, e in offsets):
        return [example]
    return [RefExample(example.text[: sp.end], [sp], sp.prompt, name=f"{example.name} up to reply {k + 1}")
            for k, sp in enumerate(example.spans)]


def locate(tokenizer, messages: list[dict], tools, text: str) -> tuple[dict[int, Span], dict[int, str]]:
    """({message index: its trained span}, {message index: why it has none}) of the assistant turns in TEXT."""
    stops = [s for s in dict.fromkeys([*END_OF_TURN, tokenizer.eos_token]) if s]
    # Stripped: templates may trim (Llama 3), and leading whitespace could match the template's own.
    contents = [m["content"].strip() for m in messages]
    spans, notes, cursor, prev_end = {}, {}, 0, 0
    for i, m in enumerate(messages):
        content, calls = contents[i], m.get("tool_calls")
        if m["role"] != "assistant":
            at = text.find(content, cursor) if content else -1
            if at >= 0:
                cursor = at + len(content)
            continue
        if not content and not calls:
            notes[i] = f"message {i} is an empty assistant turn: nothing in it is assistant content"
            continue
        prompt = _prompt(tokenizer, messages[:i], tools, text, cursor)
        floor = len(prompt) if prompt is not None else 0
        at = text.find(content, max(cursor, floor)) if content else -1
        note = ""
        if at >= 0:
            gap = text[floor:at] if prompt is not None else ""
            if gap.strip() and not any(c and c in gap for k, c in enumerate(contents) if k != i):
                # what the template writes after the generation prompt, before the reply: generated too
                left = start = floor
                note = f"trains the template's text between the generation prompt and the reply: {_short(gap)}"
            else:
                # Whitespace right before the content may belong to the response's first token
                # ('[/INST] Hello' -> '▁Hello'), but not past the end of the prompt or the previous turn.
                left = start = at
                while left > max(prev_end, floor) and text[left - 1].isspace():
                    left -= 1
            after = at + len(content)
        elif content and not calls:
            notes[i] = f"assistant message {i} is not in the template's rendering verbatim: {_short(content)}"
            continue
        elif prompt is not None:  # tool calls (content, if any, not verbatim): from the generation prompt
            left = start = after = floor
        else:
            notes[i] = f"assistant message {i} has tool calls, and no generation prompt leads into it: not located"
            continue
        end = _turn_end(text, after, stops, search=bool(calls))
        if end is None:
            notes[i] = f"assistant message {i}: no end-of-turn marker follows its tool calls"
            continue
        spans[i] = Span(left, start, end, prompt, note)
        cursor = prev_end = end
    return spans, notes


def _has_reply(message: dict) -> bool:
    return bool(message["content"].strip() or message.get("tool_calls"))


def _prompt(tokenizer, before: list[dict], tools, text: str, cursor: int) -> str | None:
    """The generation prompt after BEFORE, when its render is a prefix of TEXT past CURSOR (else None)."""
    try:
        prompt = render(tokenizer, before, tools, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - e.g. a template that reads messages[0] or insists on alternating roles
        return None
    return prompt if cursor <= len(prompt) < len(text) and text.startswith(prompt) else None


def _turn_end(text: str, after: int, stops: list[str], search: bool) -> int | None:
    """The end of the end-of-turn marker(s) after AFTER: right after it (whitespace between allowed), or
    with SEARCH the first one anywhere after it (tool calls come between); None when SEARCH finds none."""
    end = after
    if search:
        found = [(text.find(s, after), -len(s)) for s in stops if text.find(s, after) >= 0]
        if not found:
            return None
        at, length = min(found)
        end = at - length
    while True:  # any further marker(s) right after
        k = end
        while k < len(text) and text[k].isspace():
            k += 1
        stop = next((s for s in stops if text.startswith(s, k)), None)
        if stop is None:
            return end
        end = k + len(stop)


def _tokenize(tokenizer, example: RefExample) -> None:
    enc = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
    example.ids = enc["input_ids"]
    text, spans = example.text, example.spans
    for s, e in enc["offset_mapping"]:
        example.should.append(e > s and any(e > sp.start and s < sp.end and s >= sp.left for sp in spans))
        # a token of nothing but the whitespace the template puts before the content: either way is fine
        example.neutral.append(e > s and any(s >= sp.left and e <= sp.start for sp in spans) and not text[s:e].strip())


# --- comparison ---------------------------------------------------------------------------------


def check_row(row: dict, fmt: str, roles: dict, renderer, tokenizer) -> Result:
    from qlora_cli.data.formats import BadRow, to_canonical
    from qlora_cli.data.templates import _fold_system

    outputs = qlora_examples(row, fmt, roles, renderer, tokenizer)
    status, reason = outputs[0][:2]
    if status in ("bad", "template", "role"):
        return Result("REFUSED", f"{status}: {reason}")
    if all(o[0] != "ok" for o in outputs):
        return Result("SKIPPED", f"{status}: {reason or 'no token carries a loss'}", examples=len(outputs))
    try:
        example = to_canonical(row, fmt, roles)
        messages = example["messages"]
        if renderer.template.folds_system:
            messages = _fold_system(messages)
        refs, notes = reference(tokenizer, messages, example.get("tools"))
    except BadRow as exc:  # qlora accepted what the converter refuses: cannot happen unless they drift apart
        return Result("MISMATCH", f"the row converts for qlora but not here: {exc}", kinds=["conversion"])
    except Exception as exc:  # noqa: BLE001 - the template's own apply_chat_template refused the row
        return Result("MISMATCH", f"qlora trains this row, but apply_chat_template fails on it: {exc}",
                      kinds=["reference fails"])
    result = Result("OK", examples=len(outputs))
    several = len(outputs) > 1 or len(refs) > 1

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pairs, unmatched = _pair([o[2] for o in outputs], refs, decode)
    for j, k in pairs:
        details, kinds, example_notes, note_kinds = compare(outputs[j][2], outputs[j][3], refs[k], tokenizer, decode)
        where = f"example {j + 1} ({refs[k].name}): " if several else ""
        result.details += [where + d for d in details]
        result.kinds += kinds
        result.notes += [where + n for n in example_notes]
        result.note_kinds += note_kinds
    for j in unmatched[0]:
        result.details.append(f"example {j + 1} of qlora's has no counterpart in the reference: ends with "
                              f"{_short(decode(outputs[j][2])[-SHOW:])}")
        result.kinds.append("examples differ")
    for k in unmatched[1]:
        result.details.append(f"the reference's example {refs[k].name} (ending with {_short(refs[k].text[-SHOW:])}) "
                              "is not among qlora's")
        result.kinds.append("examples differ")
    result.notes += notes
    if result.kinds:
        result.status = "MISMATCH"
        result.details += [f"note: {n}" for n in result.notes]
    else:
        result.details = [f"note: {n}" for n in result.notes]
    return result


def _pair(qlora_ids: list[list[int]], refs: list[RefExample], decode):
    """([(qlora example, reference example)], (qlora's unmatched, the reference's unmatched)): by the same ids,
    else the same decoded text, else one decoded text a prefix of the other, else the same position."""
    texts = {}

    def ref_text(k):
        if k not in texts:
            texts[k] = decode(refs[k].ids)
        return texts[k]

    free, pairs, alone = list(range(len(refs))), [], []
    tests = [
        lambda ids, text, k: refs[k].ids == ids,
        lambda ids, text, k: ref_text(k) == text,
        lambda ids, text, k: ref_text(k).startswith(text) or text.startswith(ref_text(k)),
    ]
    todo = list(range(len(qlora_ids)))
    for test in tests:
        for j in list(todo):
            text = decode(qlora_ids[j]) if test is not tests[0] else None
            k = next((k for k in free if test(qlora_ids[j], text, k)), None)
            if k is not None:
                pairs.append((j, k))
                free.remove(k)
                todo.remove(j)
    for j in todo:
        if j in free:
            pairs.append((j, j))
            free.remove(j)
        else:
            alone.append(j)
    return sorted(pairs), (alone, free)


def compare(ids: list[int], trained: list[bool], ref: RefExample, tokenizer, decode):
    """(details, mismatch kinds, notes, note kinds) of one of qlora's examples against the reference's."""
    notes = [sp.note for sp in ref.spans if sp.note]
    note_kinds = [NOTE_GAP] if notes else []
    if ids == ref.ids:
        details, kinds = _token_diff(ids, trained, ref, tokenizer)
        return details, kinds, notes, note_kinds
    where = next((i for i, (a, b) in enumerate(zip(ids, ref.ids)) if a != b), min(len(ids), len(ref.ids)))
    text, ref_text = decode(ids), decode(ref.ids)
    if text != ref_text:
        at = next((i for i, (a, b) in enumerate(zip(text, ref_text)) if a != b), min(len(text), len(ref_text)))
        return ([f"qlora's text differs from apply_chat_template's from character {at} (token {where}): "
                 f"{_short(text[at:at + 40])} vs {_short(ref_text[at:at + 40])}"], ["rendered text differs"],
                notes, note_kinds)
    details = []
    if ref.prompt is not None:
        prompt_ids = tokenizer(ref.prompt, add_special_tokens=False).input_ids
        if ids[: len(prompt_ids)] != prompt_ids:
            k = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
            inside = " (inside that prompt: qlora split it at an earlier reply's start)" if any(
                trained[k:len(prompt_ids)]) else ""
            details.append(
                f"does not start with the last reply's generation prompt tokenized alone ({len(prompt_ids)} tokens, "
                f"what `qlora generate` feeds): from token {k}{inside}, "
                f"{tokenizer.convert_ids_to_tokens(ids[k:k + 3])} vs "
                f"{tokenizer.convert_ids_to_tokens(prompt_ids[k:k + 3])}")
    flags = [False, *trained[1:]]  # position 0 is never a target
    runs = list(_runs(flags))
    got = [t.strip() for t in _decoded_runs(decode, ids, runs) if t.strip()]
    want = [ref.text[a:b].strip() for a, b in _merged(ref.spans) if ref.text[a:b].strip()]
    if got != want:
        details.append(f"trains {len(got)} run(s) of text, the reference {len(want)}: "
                       + "; ".join(f"{_short(g)} vs {_short(w)}" for g, w in zip(got, want) if g != w)
                       + "".join(f"; extra {_short(g)}" for g in got[len(want):])
                       + "".join(f"; missing {_short(w)}" for w in want[len(got):]))
    if details:
        return [f"seam at token {where}: " + d for d in details], ["seam"], notes, note_kinds
    seam = next((i for i in range(where, len(flags)) if flags[i]), where)
    return [], [], [*notes, f"seam: prompt and reply tokenized apart at token {seam}"], [*note_kinds, NOTE_SEAM]


def _token_diff(ids, trained, ref: RefExample, tokenizer) -> tuple[list[str], list[str]]:
    should, neutral = ref.should, ref.neutral
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
    return details, kinds


def _decoded_runs(decode, ids: list[int], runs) -> list[str]:
    """The text of ids[a:b] for each run, as it reads inside the whole sequence: decoding up to its end less
    decoding up to its start (a SentencePiece decoder drops the word-start space of a run decoded alone);
    the run alone where the two do not line up (a run ending inside a multi-byte character)."""
    out = []
    for a, b in runs:
        before, after = decode(ids[:a]), decode(ids[:b])
        out.append(after[len(before):] if after.startswith(before) else decode(ids[a:b]))
    return out


def _merged(spans: list[Span]) -> list[tuple[int, int]]:
    out = []
    for sp in sorted(spans, key=lambda sp: sp.start):
        if out and sp.start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], sp.end))
        else:
            out.append((sp.start, sp.end))
    return out


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
                     ("prompt", "prompt_completion"), ("text", "text")):
        if isinstance(row, dict) and key in row:
            return fmt
    raise SystemExit(f"cannot guess the format of {row!r:.80}: pass --format")


def check_file(path: Path, args, renderer, tokenizer, out) -> Counter:
    rows = read_rows(path, args.max_rows)
    fmt = args.format or guess_format(rows[0] if rows else {})
    roles = dict(DEFAULT_ROLES) if fmt == "sharegpt" else {}
    roles.update(args.roles)
    counts, kinds, note_kinds, reasons = Counter(), Counter(), Counter(), Counter()
    print(f"== {path} ({fmt}, {len(rows)} rows)", file=out)
    for n, row in enumerate(rows, 1):
        if fmt == "text":  # trained whole (BOS + text + EOS): no template, nothing to compare
            result = Result("SKIPPED", PLAIN_TEXT)
        elif isinstance(row, dict):
            result = check_row(row, fmt, roles, renderer, tokenizer)
        else:
            result = Result("REFUSED", "not a JSON object")
        counts[result.status] += 1
        kinds.update(dict.fromkeys(result.kinds, 1))
        note_kinds.update(dict.fromkeys(result.note_kinds, 1))
        if result.status in ("REFUSED", "SKIPPED"):
            reasons[result.reason if len(result.reason) <= 110 else result.reason[:107] + "..."] += 1
        if (args.quiet and result.status == "OK") or fmt == "text":
            continue
        several = f" ({result.examples} examples)" if result.examples > 1 else ""
        print(f"  row {n}: {result.status}{several}" + (f": {result.reason}" if result.reason else ""), file=out)
        for line in result.details:
            print(f"      {line}", file=out)
    print(f"-- {path.name}: {counts['OK']} OK, {counts['MISMATCH']} mismatched, {counts['REFUSED']} refused, "
          f"{counts['SKIPPED']} skipped (of {len(rows)})", file=out)
    for kind, k in kinds.most_common():
        print(f"     mismatch: {kind}: {k} rows", file=out)
    for kind, k in note_kinds.most_common():
        print(f"     note: {kind}: {k} rows", file=out)
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
