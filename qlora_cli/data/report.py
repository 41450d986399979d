"""What `qlora data` shows: rendered examples with the trained tokens marked, and the statistics.

    examples = example_segments(prepared.train, tokenizer, n=3)   # JSON-ready
    console.print(render_example(examples[0]))                    # trained tokens bright, the rest dim
    console.print(render_stats(prepared.stats, recipe.data))

The point is that a person sees at a glance what the model will learn: the exact text the model
is fed (template, special tokens and all), and which part of it carries the loss.
"""

from __future__ import annotations

import re

from qlora_cli.data.tokenize import IGNORE_INDEX

TRAINED_STYLE = "bold green"
MASKED_STYLE = "dim"


def data_warnings(stats, pairs: bool = False) -> list[str]:
    """Things a user should hear about before training on this data. pairs: preference data
    (data/preference.py), where on_too_long: split does not apply."""
    out = list(stats.notes)
    if stats.split_rows:
        out.append(
            f"{stats.split_rows} conversation(s) are trained as one example per assistant turn: the template "
            "writes earlier turns differently once the conversation goes on (it drops past reasoning), so each "
            "turn is trained in the context it has when the model answers it"
        )
    if stats.bad_rows:
        out.append(f"skipped {stats.bad_rows} bad row(s) (data.on_bad_row: skip); the first:")
        out.extend(f"  {line}" for line in stats.bad_row_examples)
    if stats.dropped_too_long:
        out.append(f"dropped {stats.dropped_too_long} example(s) longer than max_seq_len (data.on_too_long: drop)")
    if stats.dropped_no_response:
        out.append(f"dropped {stats.dropped_no_response} example(s) whose response starts after max_seq_len")
    kept = sum(s.kept for s in stats.sources + stats.val_sources) or 1
    if stats.truncated / kept > 0.05:
        remedy = ("the prompt and each reply's first tokens are kept: raise data.max_seq_len, or leave these pairs "
                  "out with on_too_long: drop" if pairs else
                  "plain text can be split into max_seq_len blocks instead: on_too_long: split, with packing")
        out.append(f"{stats.truncated} of {kept} examples are truncated to max_seq_len (data.on_too_long: truncate; "
                   f"{remedy})")
    if stats.split_documents:
        out.append(f"{stats.split_documents} document(s) longer than max_seq_len are split into blocks "
                   f"({stats.blocks:,} training sequences in all; data.on_too_long: split): every token is trained, "
                   "and a block sees only its own tokens")
    return out


def data_losses(data: dict, max_seq_len: int) -> str | None:
    """What the run did not train on, and how to keep it, from summary.json's "data" (a DataStats
    dict): for the end panel and the model card, which show it beside the results. None: nothing lost."""
    kept = sum(s["kept"] for s in data.get("sources", []) + data.get("val_sources", []))
    seen = kept + data.get("dropped_too_long", 0) + data.get("dropped_no_response", 0)
    parts = []
    if data.get("truncated"):
        parts.append(f"{data['truncated']:,} of {seen:,} examples cut to max_seq_len={max_seq_len} (their ends were "
                     "not trained: raise data.max_seq_len, set data.on_too_long: drop, or for plain text split "
                     "with packing)")
    if data.get("dropped_too_long"):
        parts.append(f"{data['dropped_too_long']:,} dropped as longer than max_seq_len (raise data.max_seq_len)")
    if data.get("dropped_no_response"):
        parts.append(f"{data['dropped_no_response']:,} dropped with no response token within max_seq_len "
                     "(raise data.max_seq_len)")
    if data.get("bad_rows"):
        first = (data.get("bad_row_examples") or [""])[0]
        parts.append(f"{data['bad_rows']:,} bad rows skipped ({first}; `qlora data` lists them)")
    return "; ".join(parts) or None


def example_segments(ds, tokenizer, n: int, block: int | None = None) -> list[dict]:
    """The first n rows as runs of text that are trained or not, decoded exactly (special tokens kept).
    `block`: the max_seq_len of on_too_long: split, whose blocks each example reports."""
    out = []
    for i in range(min(n, len(ds))):
        row = ds[i]
        flags = [label != IGNORE_INDEX for label in row["labels"]]
        cuts = [k for k in range(1, len(flags)) if flags[k] != flags[k - 1]]
        bounds = [0, *cuts, len(flags)]
        texts = _decoded_runs(tokenizer, row["input_ids"], bounds)
        segments = [{"text": t, "trained": flags[a]} for t, a in zip(texts, bounds) if t]
        out.append(
            {
                "source": row["source"],
                "file": row["file"],
                "row": row["row"],
                "tokens": len(row["input_ids"]),
                "trained_tokens": row["trained"],
                "truncated": row["length"] > len(row["input_ids"]),
                "blocks": -(-len(row["input_ids"]) // block) if block else 1,
                "segments": segments,
            }
        )
    return out


def _decoded_runs(tokenizer, ids: list[int], bounds: list[int]) -> list[str]:
    """The text of ids[a:b] for consecutive bounds, as it reads inside the whole sequence.

    Decoding a run alone is not that: a SentencePiece decoder drops the word-start space of a run's
    first token ('France is' + 'Paris.' for 'France is Paris.'). So each run is the difference between
    decoding everything up to its end and everything before it; where a run ends inside a character
    (a byte token of a multi-byte letter) and the prefixes disagree, the run is decoded alone.
    """
    def upto(k: int) -> str:
        return tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    prefixes = [upto(b) for b in bounds]
    out = []
    for (a, b), before, after in zip(zip(bounds, bounds[1:]), prefixes, prefixes[1:]):
        if after.startswith(before):
            out.append(after[len(before):])
        else:
            out.append(tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return out


def render_example(example: dict, where: str):
    """A rich renderable: a header line, then the text with trained runs bright and masked runs dim."""
    from rich.console import Group
    from rich.text import Text

    header = Text(
        f"{where}  {example['tokens']} tokens, {example['trained_tokens']} trained"
        + ("  (truncated)" if example["truncated"] else "")
        + (f"  (split into {example['blocks']} blocks; each block's first token is masked)"
           if example.get("blocks", 1) > 1 else ""),
        style="bold",
    )
    body = Text()
    for seg in example["segments"]:
        body.append(seg["text"], style=TRAINED_STYLE if seg["trained"] else MASKED_STYLE)
    return Group(header, body, Text(""))


STATS_COLUMNS = ("rows", "bad", "cut", "long", "no reply", "kept", "val", "train")
STATS_CAPTION = ("bad: rows skipped; cut: truncated to max_seq_len; long: dropped as longer than max_seq_len; "
                 "no reply: dropped, no response token within max_seq_len; val: validation rows")


def render_stats(stats, data):
    """A rich renderable with per-source counts, lengths and batching efficiency."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # Laid out for 80 columns: short headers (spelled out in the caption), the numbers never wrapped,
    # and the source path wrapped onto more lines (PathCell) rather than cut.
    table = Table(title="sources", title_justify="left", show_edge=False, caption=STATS_CAPTION,
                  caption_justify="left")
    table.add_column("source", justify="left", ratio=1, min_width=12)
    for col in STATS_COLUMNS:
        table.add_column(col, justify="right", no_wrap=True)
    for s in stats.sources:
        table.add_row(
            PathCell(s.path), *map(str, (s.rows, s.bad_rows, s.truncated, s.dropped_too_long, s.dropped_no_response, s.kept)),
            str(s.held_out), str(s.used),
        )
    for s in stats.val_sources:
        table.add_row(
            PathCell(f"{s.path} (val)"),
            *map(str, (s.rows, s.bad_rows, s.truncated, s.dropped_too_long, s.dropped_no_response, s.kept)),
            str(s.used), "-",
        )

    lines = [
        f"train rows {stats.train_rows}, validation rows {stats.val_rows}",
        f"tokens per epoch {stats.train_tokens:,}, trained (with a loss) {stats.trained_tokens:,} "
        f"({stats.trained_tokens / max(stats.train_tokens, 1):.0%})",
    ]
    if data.on_too_long == "split":
        lines.append(f"split: {stats.split_documents} document(s) longer than max_seq_len, {stats.blocks:,} "
                     f"sequences of at most {data.max_seq_len} tokens in all (lengths below are theirs)")
    if stats.lengths:
        q = stats.lengths
        lines.append(
            f"example length in tokens: min {q['min']}, median {q['p50']}, p90 {q['p90']}, p99 {q['p99']}, "
            f"max {q['max']} (max_seq_len {data.max_seq_len})"
        )
    hist = Text()
    if stats.histogram:
        peak = max(c for *_, c in stats.histogram) or 1
        for lower, upper, count in stats.histogram:
            hist.append(f"  {lower:>6}-{upper:<6} {'#' * round(30 * count / peak):<30} {count}\n")
    b = stats.batching
    if b.get("packed_rows") is not None:
        lines.append(
            f"padding efficiency (real tokens in padded batches of {b['batch_size']}): "
            f"{b['padding_efficiency']:.1%} without packing, {b['packing_efficiency']:.1%} with packing"
        )
        lines.append(
            f"batches per epoch: {b['batches_per_epoch']} without packing, {b['packed_batches_per_epoch']} "
            f"with packing ({b['packed_rows']} packed rows); packing is {'on' if data.packing else 'off'}"
        )
    elif b:  # built without packing's figures (build_datasets' packing_figures)
        lines.append(f"padding efficiency (real tokens in padded batches of {b['batch_size']}): "
                     f"{b['padding_efficiency']:.1%}; batches per epoch: {b['batches_per_epoch']}")
    lines.append(f"cache: {stats.cache}")
    return Group(table, Text(""), Text("\n".join(lines)), Text("length histogram:"), hist)


class PathCell:
    """A path in a table cell, wrapped after its slashes to the cell's width (rich wraps only at spaces,
    and would fold a path anywhere, or cut it with …). A part wider than the cell is folded."""

    def __init__(self, path: str):
        self.parts = [p for p in re.split(r"(?<=/)", path) if p]

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement(min(max(map(len, self.parts), default=1), options.max_width),
                           sum(map(len, self.parts)))

    def __rich_console__(self, console, options):
        from rich.text import Text

        width, lines = max(1, options.max_width), [""]
        for part in self.parts:
            if lines[-1] and len(lines[-1]) + len(part) > width:
                lines.append("")
            lines[-1] += part
        folded = [line[i : i + width] for line in lines for i in range(0, len(line), width)]
        yield Text("\n".join(folded), no_wrap=True)
