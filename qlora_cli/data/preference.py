"""Preference data (train.method dpo, orpo, kto) -> token ids of prompt, chosen and rejected replies.

    prepared = build_preference_datasets(recipe.data, tokenizer, template, seed, method="dpo")
    prepared.train[0]   # {"prompt_ids", "chosen_ids", "rejected_ids", "row", "file", "source", ...}

The row shapes read (format: preference):
  - {"prompt": str | messages, "chosen": str | message | [message], "rejected": ...}
  - {"conversations": [{from, value}], "chosen": {from, value}, "rejected": {from, value}} (LLaMA-Factory)
  - {"messages": [{role, content}], "chosen": ..., "rejected": ...}
  - {"chosen": messages, "rejected": messages}: whole conversations that share their prompt (TRL's
    "implicit prompt" form); the prompt is the turns they have in common.
and (format: unpaired, KTO's) {"messages" | "conversations": [... ending in the judged assistant
reply], "label": bool}, or {"prompt", "completion", "label"}.

Every prompt is rendered by the run's template exactly as SFT renders it (templates.Renderer): a pair
is two conversations, prompt + chosen and prompt + rejected, each rendered and tokenized as SFT
would train it (tokenize.encode, so the prompt's tokens are those of the prompt text alone, what
`qlora generate` feeds). The scored tokens of a reply are exactly the tokens SFT would train for
it: its content and the template's stop token. So TRL's trainers get pre-tokenized rows and score
what the run's template says a reply is; they never apply a chat template of their own.

Bad rows (not a pair, a prompt that does not end with a user turn, an empty or identical chosen
and rejected, a missing label) follow data.on_bad_row like SFT's, with the file and row named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from qlora_cli.data.formats import BadRow, UnmappedRole, to_canonical
from qlora_cli.data.pipeline import (
    MAX_REPORTED,
    DataStats,
    SourceStats,
    length_histogram,
    length_percentiles,
)
from qlora_cli.data.sources import (
    BAD_COLUMN,
    JSON_COLUMN,
    ROW_COLUMN,
    check_data_files,
    load_file,
    load_hub,
    resolve_files,
    row_label,
)
from qlora_cli.data.templates import Renderer, TemplateMismatch
from qlora_cli.data.tokenize import encode, lone_surrogate
from qlora_cli.errors import Problem, UserError

# The fields each preference format reads, in the names `columns:` maps.
PREFERENCE_FIELDS = {
    "preference": ("prompt", "chosen", "rejected", "conversations", "messages", "tools"),
    "unpaired": ("prompt", "completion", "label", "conversations", "messages", "tools"),
}
ASSISTANT_NAMES = {"assistant", "gpt", "model", "bot"}


@dataclass
class PreparedPreference:
    train: object  # datasets.Dataset
    val: object | None
    stats: DataStats
    method: str

    def for_trainer(self):
        """(train, val) with only the columns TRL's preference collators read."""
        keep = ["prompt_ids", "completion_ids", "label"] if self.method == "kto" else [
            "prompt_ids", "chosen_ids", "rejected_ids"]
        return self.train.select_columns(keep), self.val.select_columns(keep) if self.val is not None else None


# ---------------------------------------------------------------------------------------------
# One row -> canonical conversations.


def to_pair(row: dict, roles: dict | None = None) -> tuple[list[dict], dict, dict, list | None]:
    """(prompt messages, chosen reply, rejected reply, tools) from one preference row; BadRow if it is not one."""
    tools = row.get("tools")
    for field in ("chosen", "rejected"):
        if row.get(field) in (None, "", [], {}):
            raise BadRow(f"field '{field}' is missing or empty")
    if all(isinstance(row[f], list) and len(row[f]) > 1 for f in ("chosen", "rejected")):
        # Whole conversations (UltraFeedback's binarized sets also give the prompt text beside them).
        return _implicit_prompt(row["chosen"], row["rejected"], roles, tools)
    if row.get("prompt") is None and row.get("conversations") is None and row.get("messages") is None:
        if isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
            return _implicit_prompt(row["chosen"], row["rejected"], roles, tools)
        raise BadRow("has no prompt: expected 'prompt', 'conversations' or 'messages' beside chosen and rejected")
    prompt = _prompt_turns(row)
    chosen_conv = _conversation(prompt, _reply(row["chosen"], "chosen"), roles, tools)
    rejected_conv = _conversation(prompt, _reply(row["rejected"], "rejected"), roles, tools)
    messages = chosen_conv["messages"][:-1]
    chosen, rejected = chosen_conv["messages"][-1], rejected_conv["messages"][-1]
    _check_prompt_and_replies(messages, [chosen, rejected])
    if chosen.get("content") == rejected.get("content") and chosen.get("tool_calls") == rejected.get("tool_calls"):
        raise BadRow("chosen and rejected are identical: there is nothing to prefer")
    return messages, chosen, rejected, chosen_conv.get("tools")


def to_unpaired(row: dict, roles: dict | None = None) -> tuple[list[dict], dict, bool, list | None]:
    """(prompt messages, reply, label, tools) from one KTO row; BadRow if it is not one."""
    label = row.get("label")
    if label is None:
        raise BadRow("field 'label' is missing: true for a desirable reply, false for an undesirable one")
    if not isinstance(label, bool):
        raise BadRow(f"field 'label' must be true or false, got {json.dumps(label)}")
    if row.get("completion") is not None:
        if row.get("prompt") in (None, ""):
            raise BadRow("field 'prompt' is missing or empty")
        prompt, reply = _prompt_turns(row), _reply(row["completion"], "completion")
    else:
        turns = _prompt_turns(row)
        if not turns:
            raise BadRow("has no conversation: expected 'messages' or 'conversations' (or prompt/completion)")
        prompt, reply = turns[:-1], turns[-1]
    conv = _conversation(prompt, reply, roles, row.get("tools"))
    messages, last = conv["messages"][:-1], conv["messages"][-1]
    _check_prompt_and_replies(messages, [last])
    return messages, last, label, conv.get("tools")


def _prompt_turns(row: dict) -> list:
    prompt = row.get("prompt")
    if prompt is None:
        prompt = row.get("conversations") if row.get("conversations") is not None else row.get("messages")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("field 'prompt' is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise BadRow(f"the prompt must be a string or a list of messages, got {type(prompt).__name__}")
    return list(prompt)


def _reply(value, field: str):
    """A reply as one message: a string, a message, or a list holding one message."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRow(f"field '{field}' is empty")
        return {"role": "assistant", "content": value}
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRow(f"field '{field}' must be one reply, not a list of {len(value)} messages")
        value = value[0]
    if not isinstance(value, dict):
        raise BadRow(f"field '{field}' must be a string or a message, got {type(value).__name__}")
    role = value.get("role", value.get("from"))
    if not isinstance(role, str) or role.lower() not in ASSISTANT_NAMES:
        raise BadRow(f"field '{field}' must be an assistant reply, not a {role!r} turn")
    content = value.get("content", value.get("value"))
    if not value.get("tool_calls") and (not isinstance(content, str) or not content.strip()):
        raise BadRow(f"field '{field}' is empty")
    return value


def _conversation(prompt: list, reply, roles, tools) -> dict:
    """Prompt turns + reply through formats.to_canonical, so roles, tool calls and tools are read as
    SFT reads them. Turns written as {from, value} are ShareGPT's; {role, content} OpenAI's."""
    turns = [*prompt, reply]
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow(f"turn {i} of the prompt must be a message object, got {type(turn).__name__}")
    sharegpt = any("from" in t for t in turns)
    if sharegpt:  # one style per conversation: a reply given as {role, content} joins ShareGPT turns
        turns = [t if "from" in t else {**{k: v for k, v in t.items() if k not in ("role", "content")},
                                         "from": t.get("role"), "value": t.get("content")} for t in turns]
        row = {"conversations": turns, "tools": tools}
    else:
        row = {"messages": turns, "tools": tools}
    return to_canonical(row, "sharegpt" if sharegpt else "messages", roles)


def _implicit_prompt(chosen: list, rejected: list, roles, tools):
    """TRL's implicit-prompt pairs: two whole conversations; the prompt is what they share."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) and shared == len(rejected):
        raise BadRow("chosen and rejected are identical: there is nothing to prefer")
    if len(chosen) - shared != 1 or len(rejected) - shared != 1:
        raise BadRow("chosen and rejected conversations must share every turn but their last reply")
    return to_pair({"messages": chosen[:shared], "chosen": chosen[shared], "rejected": rejected[shared],
                    "tools": tools}, roles)


def _check_prompt_and_replies(prompt: list[dict], replies: list[dict]) -> None:
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        last = prompt[-1]["role"] if prompt else "nothing"
        raise BadRow(f"the prompt must end with a user turn (the reply answers it), but it ends with {last}")
    for reply in replies:
        if reply["role"] != "assistant":
            raise BadRow(f"the reply must be an assistant turn, not {reply['role']}")


# ---------------------------------------------------------------------------------------------
# Rendering and tokenizing.


def encode_reply(renderer: Renderer, tokenizer, prompt: list[dict], reply: dict, tools=None) -> tuple[list, list]:
    """(prompt ids, reply ids): the conversation prompt + reply rendered and tokenized as SFT trains it,
    cut where the reply's trained tokens start. The reply ids are exactly SFT's trained tokens (content
    and stop token); the prompt ids are the tokens of the prompt text alone (tokenize.py's seam policy)."""
    examples = renderer.examples([*prompt, reply], tools)
    text, spans = examples[0]
    if not spans:
        raise BadRow("the reply renders to nothing the template trains")
    start, end = spans[-1]  # the last reply: the one being judged
    prompt_text = renderer.prompt(prompt, tools)
    if text[:start] != prompt_text:
        raise TemplateMismatch(
            f"template {renderer.template.name!r} renders the prompt differently when a reply follows it, so the "
            "reply cannot be scored after the prompt `qlora generate` gives the model"
        )
    if (at := lone_surrogate(text)) is not None:  # the Rust tokenizer refuses the whole batch holding one
        raise BadRow(f"holds a lone surrogate {text[at]!r} (half of a UTF-16 pair), which is not text")
    enc = encode(tokenizer, [text[:end]], [[(start, end)]], train_on_inputs=False)
    ids, trained = enc.ids.tolist(), enc.trained
    where = np.flatnonzero(trained)
    if len(where) == 0:
        raise BadRow("the reply has no token to score")
    first, last = int(where[0]), int(where[-1])
    return ids[:first], ids[first : last + 1]


@dataclass
class _Outcome:
    status: str  # ok, bad, too_long, prompt_too_long
    reason: str = ""
    record: dict | None = None


def _process_row(row: dict, method_format: str, roles, renderer, tokenizer, max_seq_len: int) -> _Outcome:
    try:
        if method_format == "preference":
            prompt, chosen, rejected, tools = to_pair(row, roles)
            prompt_ids, chosen_ids = encode_reply(renderer, tokenizer, prompt, chosen, tools)
            prompt_ids_r, rejected_ids = encode_reply(renderer, tokenizer, prompt, rejected, tools)
            if prompt_ids != prompt_ids_r:
                raise BadRow("the prompt tokenizes differently before chosen and before rejected")
            if chosen_ids == rejected_ids:
                raise BadRow("chosen and rejected are the same tokens: there is nothing to prefer")
            record = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
                      "length": len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))}
        else:
            prompt, reply, label, tools = to_unpaired(row, roles)
            prompt_ids, completion_ids = encode_reply(renderer, tokenizer, prompt, reply, tools)
            record = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label,
                      "length": len(prompt_ids) + len(completion_ids)}
    except UnmappedRole:
        raise
    except TemplateMismatch as exc:
        raise UserError([Problem("data.template", str(exc))]) from None
    except BadRow as exc:
        return _Outcome("bad", str(exc))
    if len(record["prompt_ids"]) >= max_seq_len:
        return _Outcome("prompt_too_long", f"the prompt alone has {len(record['prompt_ids'])} tokens", record)
    if record["length"] > max_seq_len:
        return _Outcome("too_long", f"{record['length']} tokens, more than max_seq_len={max_seq_len}", record)
    return _Outcome("ok", record=record)


def _records(raw, rename: dict):
    """(row number, row in the format's field names) for each row of a loaded file."""
    columns = raw.column_names
    for item in raw:
        number = item[ROW_COLUMN]
        if JSON_COLUMN in columns:
            if item.get(BAD_COLUMN) is not None:
                yield number, BadRow(item[BAD_COLUMN])
                continue
            try:
                record = json.loads(item[JSON_COLUMN])
            except json.JSONDecodeError as exc:
                yield number, BadRow(f"malformed JSON: {exc.msg} at character {exc.pos + 1}")
                continue
            if not isinstance(record, dict):
                yield number, BadRow(f"expected a JSON object, got {type(record).__name__}")
                continue
        else:
            record = {k: v for k, v in item.items() if k != ROW_COLUMN}
        yield number, {field: record.get(column) for column, field in rename.items()}


def _process_source(source, index: int, where: str, data, renderer, tokenizer, stats: DataStats):
    fields = PREFERENCE_FIELDS[source.format]
    unknown = sorted(set(source.columns) - set(fields))
    if unknown:
        raise UserError.single(f"{where}.columns", f"{', '.join(unknown)} is not a field of the {source.format} "
                               f"format ({', '.join(fields)})")
    rename = {source.columns.get(f, f): f for f in fields}
    s = SourceStats(path=source.path)
    files = resolve_files(source, where)
    s.files = [str(f) for f in files] or [source.path]
    kept = []
    for file_index, path in enumerate(files or [None]):
        raw = load_file(path, source, where) if path is not None else load_hub(source, where)
        name = str(path) if path is not None else source.path
        label = row_label(name, source)
        for number, row in _records(raw, rename):
            s.rows += 1
            if isinstance(row, BadRow):
                outcome = _Outcome("bad", str(row))
            else:
                try:
                    outcome = _process_row(row, source.format, dict(source.roles), renderer, tokenizer,
                                           data.max_seq_len)
                except UnmappedRole as exc:
                    raise UserError.single(f"{where}.roles", (
                        f"{name} {label} {number} uses tool-call roles that are not mapped: {', '.join(exc.roles)}. "
                        "Say what each becomes, e.g. roles: {function_call: assistant, observation: tool}")) from None
            located = Problem(f"{name}: {label} {number}", outcome.reason)
            if outcome.status == "bad":
                if data.on_bad_row == "error":
                    raise UserError([located], header=f"a bad row in {name} ({where}); fix or remove it, or set "
                                    "data.on_bad_row: skip:")
                s.bad_rows += 1
                if len(s.bad_row_examples) < MAX_REPORTED:
                    s.bad_row_examples.append(located.render())
                continue
            if outcome.status == "prompt_too_long":
                s.dropped_no_response += 1  # nothing of a reply would fit: nothing to score
                continue
            if outcome.status == "too_long":
                if data.on_too_long == "error":
                    raise UserError([located], header=f"an example in {name} is longer than data.max_seq_len="
                                    f"{data.max_seq_len} (data.on_too_long: error). Raise max_seq_len, or set "
                                    "on_too_long to truncate or drop:")
                if data.on_too_long == "drop":
                    s.dropped_too_long += 1
                    continue
                s.truncated += 1  # TRL's collator keeps the start: the prompt and the replies' first tokens
            kept.append({**outcome.record, "row": number, "file": file_index, "source": index})
    s.kept = len(kept)
    if not kept:
        why = "; ".join(f"{n} {text}" for n, text in [
            (s.bad_rows, "are bad rows (the first are listed below)"),
            (s.dropped_too_long, "are longer than max_seq_len (on_too_long: drop)"),
            (s.dropped_no_response, f"have a prompt of max_seq_len={data.max_seq_len} tokens or more (raise it)"),
        ] if n) or "it has no rows"
        problems = [Problem(f"{where}.path", f"nothing would be trained from {source.path}: {why}")]
        problems += [Problem(*line.split(": ", 1)) for line in s.bad_row_examples]
        raise UserError(problems)
    return kept, s


def build_preference_datasets(data, tokenizer, template, seed: int, method: str, batch_size: int = 8):
    """Load, check, render and tokenize every preference source; split off validation pairs; shuffle.
    Raises UserError naming the file and row on bad input. Small data (preference sets are thousands
    of rows), so one pass in this process; the result is not cached."""
    from datasets import Dataset

    check_data_files(data)
    renderer = Renderer(template, tokenizer)
    stats = DataStats()
    pool = []
    for i, source in enumerate(data.sources):
        rows, s = _process_source(source, i, f"data.sources[{i}]", data, renderer, tokenizer, stats)
        pool.append(_weighted(rows, source, seed, s))
        stats.sources.append(s)
    rng = np.random.default_rng(seed)
    val = []
    for i, source in enumerate(data.val_sources):
        rows, s = _process_source(source, i, f"data.val_sources[{i}]", data, renderer, tokenizer, stats)
        val += rows
        s.used = len(rows)
        stats.val_sources.append(s)
    everything = [row for rows in pool for row in rows]
    if not data.val_sources and data.val_size > 0:
        n_val = int(data.val_size) if data.val_size >= 1 else max(1, round(len(everything) * data.val_size))
        if n_val >= len(everything):
            raise UserError.single("data.val_size", f"asks for {n_val} validation pairs but the data has only "
                                   f"{len(everything)}: lower it")
        order = rng.permutation(len(everything))
        val = [everything[k] for k in order[:n_val]]
        everything = [everything[k] for k in order[n_val:]]
        for row in val:
            stats.sources[row["source"]].held_out += 1  # pairs, before KTO unpairs them
    train = [everything[k] for k in rng.permutation(len(everything))]
    if method == "kto" and any(s.format == "preference" for s in [*data.sources, *data.val_sources]):
        train, val = _unpair(train), _unpair(val)
        stats.notes.append("each pair is trained as a desirable (chosen) and an undesirable (rejected) reply")
    stats.train_rows, stats.val_rows = len(train), len(val)
    lengths = np.asarray([min(r["length"], data.max_seq_len) for r in train], dtype=np.int64)
    stats.train_tokens = int(lengths.sum())
    def scored(r, key):  # what fits in max_seq_len after the prompt (TRL's collator keeps the start)
        return min(len(r[key]), data.max_seq_len - len(r["prompt_ids"]))

    if method == "kto":
        stats.trained_tokens = sum(scored(r, "completion_ids") for r in train)
        desirable = sum(bool(r["label"]) for r in train)
        stats.notes.append(f"{desirable} desirable and {len(train) - desirable} undesirable replies")
    else:
        stats.trained_tokens = sum(scored(r, "chosen_ids") + scored(r, "rejected_ids") for r in train)
    all_sources = stats.sources + stats.val_sources
    stats.bad_rows = sum(s.bad_rows for s in all_sources)
    stats.bad_row_examples = [e for s in all_sources for e in s.bad_row_examples][:MAX_REPORTED]
    stats.truncated = sum(s.truncated for s in all_sources)
    stats.dropped_too_long = sum(s.dropped_too_long for s in all_sources)
    stats.dropped_no_response = sum(s.dropped_no_response for s in all_sources)
    stats.lengths = length_percentiles(lengths)
    stats.histogram = length_histogram(lengths, data.max_seq_len)
    stats.batching = {"batch_size": batch_size, "batches_per_epoch": int(np.ceil(len(train) / batch_size))}
    return PreparedPreference(Dataset.from_list(train) if train else None,
                              Dataset.from_list(val) if val else None, stats, method)


def _weighted(rows: list[dict], source, seed: int, s: SourceStats) -> list[dict]:
    """A source's rows to its weight or count (seeded), as the SFT pipeline's _mix does."""
    if source.samples is None and source.weight is None:
        s.used = len(rows)
        return rows
    n = source.samples if source.samples is not None else max(1, round(len(rows) * source.weight))
    repeats, rest = divmod(n, len(rows))
    picks = np.concatenate([np.tile(np.arange(len(rows)), repeats),
                            np.random.default_rng(seed).choice(len(rows), rest, replace=False)])
    s.used = n
    return [rows[k] for k in picks]


def _unpair(rows: list[dict]) -> list[dict]:
    """KTO from pairs: the chosen reply is a desirable example, the rejected one an undesirable one."""
    out = []
    for r in rows:
        if "completion_ids" in r:  # an unpaired row already (a source of format unpaired)
            out.append(r)
            continue
        base = {k: v for k, v in r.items() if k not in ("chosen_ids", "rejected_ids", "length")}
        out.append({**base, "completion_ids": r["chosen_ids"], "label": True,
                    "length": len(r["prompt_ids"]) + len(r["chosen_ids"])})
        out.append({**base, "completion_ids": r["rejected_ids"], "label": False,
                    "length": len(r["prompt_ids"]) + len(r["rejected_ids"])})
    return out


def as_sft_prepared(data, tokenizer, template, seed: int, batch_size: int = 8):
    """Preference data as SFT's pipeline gives it (pipeline.PreparedData: input_ids and labels, the chosen
    or desirable reply scored), for what reads a run's rows as SFT rows: merge's and export's fidelity
    checks and `qlora eval --data`. The prompt and reply tokens are the ones preference training scored."""
    from datasets import Dataset

    from qlora_cli.data.pipeline import PreparedData

    method = "kto" if all(s.format == "unpaired" for s in [*data.sources, *data.val_sources]) else "dpo"
    prepared = build_preference_datasets(data, tokenizer, template, seed=seed, method=method, batch_size=batch_size)

    def rows(ds):
        if ds is None:
            return None
        out = []
        for r in ds:
            if method == "kto" and not r["label"]:
                continue  # an undesirable reply is not one to reproduce
            reply = r["completion_ids"] if method == "kto" else r["chosen_ids"]
            ids = (r["prompt_ids"] + reply)[: data.max_seq_len]
            labels = ([-100] * len(r["prompt_ids"]) + reply)[: data.max_seq_len]
            out.append({"input_ids": ids, "labels": labels, "source": r["source"], "file": r["file"], "row": r["row"],
                        "length": len(r["prompt_ids"]) + len(reply), "trained": sum(x != -100 for x in labels)})
        return Dataset.from_list(out) if out else None

    return PreparedData(rows(prepared.train), rows(prepared.val), prepared.stats)
