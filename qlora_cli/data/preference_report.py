"""`qlora data` and `qlora validate` for preference recipes (train.method dpo, orpo, kto).

Each pair is shown twice, prompt + chosen and prompt + rejected, exactly as the trainer gets them:
the scored tokens (the reply and its stop token) bright, the prompt dim, as `qlora data` shows SFT's
trained tokens. A KTO row is shown once, with its label.
"""

from __future__ import annotations

from rich.markup import escape

from qlora_cli.data.report import _decoded_runs, data_warnings, render_example


def _example(tokenizer, prompt: list[int], reply: list[int], where: dict, max_len: int) -> dict:
    """One sequence as the trainer sees it: cut to max_seq_len (TRL's collator keeps the start)."""
    truncated = len(prompt) + len(reply) > max_len
    reply = reply[: max(0, max_len - len(prompt))]
    ids = prompt + reply
    bounds = [0, len(prompt), len(ids)] if prompt else [0, len(ids)]
    texts = _decoded_runs(tokenizer, ids, bounds)
    flags = [False, True] if prompt else [True]
    return {**where, "tokens": len(ids), "trained_tokens": len(reply), "truncated": truncated,
            "segments": [{"text": t, "trained": f} for t, f in zip(texts, flags) if t]}


def pair_examples(prepared, tokenizer, n: int, max_len: int) -> list[dict]:
    """The first n training rows: {"file", "row", "source", "chosen": example, "rejected": example}, or
    for KTO {"...", "label", "completion": example}; examples as data/report.py's example_segments."""
    files = [s.files for s in prepared.stats.sources]
    out = []
    ds = prepared.train
    for i in range(min(n, len(ds))):
        row = ds[i]
        where = {"source": row["source"], "file": files[row["source"]][row["file"]], "row": row["row"]}
        if "completion_ids" in row:
            out.append({**where, "label": bool(row["label"]),
                        "completion": _example(tokenizer, row["prompt_ids"], row["completion_ids"], where, max_len)})
        else:
            out.append({**where, "chosen": _example(tokenizer, row["prompt_ids"], row["chosen_ids"], where, max_len),
                        "rejected": _example(tokenizer, row["prompt_ids"], row["rejected_ids"], where, max_len)})
    return out


def show_data(r, tokenizer, template, n: int, as_json: bool, err, echo) -> None:
    import json

    from rich.console import Console

    from qlora_cli.data.preference import build_preference_datasets

    prepared = build_preference_datasets(r.data, tokenizer, template, seed=r.train.seed, method=r.train.method,
                                         batch_size=r.train.batch_size)
    examples = pair_examples(prepared, tokenizer, n, r.data.max_seq_len)
    for line in data_warnings(prepared.stats, pairs=True):
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if as_json:
        echo(json.dumps({"method": r.train.method, "template": template.name, "examples": examples,
                         "stats": prepared.stats.to_dict()}, indent=2, ensure_ascii=False))
        return
    out = Console(highlight=False, soft_wrap=True)
    kind = "rows" if r.train.method == "kto" else "pairs"
    out.print(f"[bold]{len(examples)} of {prepared.stats.train_rows} training {kind}[/] ({r.train.method}), template "
              f"{escape(template.name)}: [bold green]scored tokens[/] are bright, [dim]the prompt[/] is dim\n")
    for ex in examples:
        label = "line" if ex["file"].endswith(".jsonl") else "row"
        where = f"{ex['file']} {label} {ex['row']}"
        if "completion" in ex:
            out.print(render_example(ex["completion"], f"{where} {'desirable' if ex['label'] else 'undesirable'}:"))
        else:
            out.print(render_example(ex["chosen"], f"{where} chosen:"))
            out.print(render_example(ex["rejected"], f"{where} rejected:"))
    st = prepared.stats
    out.print(f"{st.train_rows} train / {st.val_rows} validation {kind}, {st.trained_tokens:,} scored tokens per epoch, "
              f"{st.truncated} truncated, {st.dropped_too_long + st.dropped_no_response} dropped, "
              f"{st.bad_rows} bad rows skipped" + "".join(f"; {note}" for note in st.notes))


def validate_line(r, tokenizer, template, recipe_path: str) -> tuple[str, list[str]]:
    """`qlora validate`'s summary line for a preference recipe, and its warnings."""
    from qlora_cli.data.preference import build_preference_datasets

    stats = build_preference_datasets(r.data, tokenizer, template, seed=r.train.seed, method=r.train.method,
                                      batch_size=r.train.batch_size).stats
    kind = "rows" if r.train.method == "kto" else "pairs"
    start = f"continuing {escape(r.model.adapter)}" if r.model.adapter else "from a fresh adapter"
    line = (f"{r.train.method} {start}: {stats.train_rows} train {kind}, {stats.val_rows} validation {kind}, "
            f"template {template.name}, {stats.truncated} truncated to max_seq_len={r.data.max_seq_len}, "
            f"{stats.dropped_too_long + stats.dropped_no_response} dropped, {stats.bad_rows} bad rows skipped")
    return line, data_warnings(stats, pairs=True)
