"""What `qlora eval` shows and keeps: the metrics table, eval_results.json and eval_predictions.jsonl.

The JSON file holds the same numbers as the table (fractions, not percentages), so scripts and
the table never disagree; the predictions file holds every generated answer beside its reference,
so a low exact-match rate can be read row by row instead of guessed at.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = "eval_results.json"
PREDICTIONS = "eval_predictions.jsonl"

# (key, label, format). Fractions are shown as percentages.
ROWS = [
    ("loss", "loss (response tokens)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("token_accuracy", "token accuracy", "{:.1%}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("rouge_l", "ROUGE-L F1", "{:.4f}"),
    ("stopped", "stopped by itself", "{:.1%}"),
    # Three significant digits: a real model on a CPU generates 0.019 samples/s, which .1f showed as 0.0.
    ("loss_samples_per_s", "samples/s (scoring)", "{:.3g}"),
    ("generate_samples_per_s", "samples/s (generating)", "{:.3g}"),
]


def render_table(results: dict):
    from rich.table import Table

    metrics, base = results["metrics"], results["base"]
    table = Table()
    table.add_column("metric")
    table.add_column(results["kind"], justify="right")
    if base:
        table.add_column(base["label"], justify="right")
        table.add_column("Δ", justify="right")
    for key, label, fmt in ROWS:
        if key not in metrics:
            continue
        cells = [label, fmt.format(metrics[key])]
        if base:
            cells.append(fmt.format(base["metrics"][key]))
            delta = results["delta"].get(key)
            cells.append("" if delta is None else _signed(fmt, delta))
        table.add_row(*cells)
    return table


def _signed(fmt: str, value: float) -> str:
    if fmt.endswith("%}"):  # a difference of two percentages is in points
        return f"{value * 100:+.1f} pt"
    text = fmt.format(value)
    return text if text.startswith("-") else "+" + text


def describe(results: dict) -> str:
    """The line under the table: what was evaluated, on what, how."""
    m = results["metrics"]
    parts = [f"{results['kind']} {results['target']}", results["data"], f"{m['response_tokens']:,} response tokens", f"batch size {results['batch_size']}"]
    if "max_new_tokens" in m:
        parts.append(f"greedy, max {m['max_new_tokens']} new tokens")
    return "; ".join(parts)


def write_results(directory: str, results: dict, predictions: list[dict]) -> list[str]:
    """Write both files next to the model, each atomically. An unwritable directory is a warning, not a
    failure: the numbers were still computed and are printed."""
    from qlora_cli.errors import UserError
    from qlora_cli.infer.generate import write_jsonl_atomically
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.util.files import write_json_atomically

    written = []
    path = Path(directory) / RESULTS
    try:
        RunDir(directory).record(RESULTS, PREDICTIONS)  # in a run directory: qlora wrote them
        write_json_atomically(path, results, ensure_ascii=False)
        written.append(str(path))
        if predictions:
            write_jsonl_atomically(Path(directory) / PREDICTIONS, predictions)
            written.append(str(Path(directory) / PREDICTIONS))
        else:  # an earlier eval's answers would not match these results
            (Path(directory) / PREDICTIONS).unlink(missing_ok=True)
    except (OSError, UserError) as exc:
        results["write_error"] = f"could not write into {directory}: {getattr(exc, 'strerror', None) or exc}"
    return written
