"""Issue 24, items 3, 5 and 14: what a new user sees while things run, at the width of their terminal.

  - the live training line at 80, 120 and 200 columns: N/M and the ETA always whole, no line wider
    than the terminal; no live frames when piped; a smoothed loss that follows the run;
  - `qlora eval`: progress on stderr while scoring, small rates shown with significant digits;
  - `qlora data --stats` at 80 columns, its length histogram, and the legend of `qlora plot`.
"""

from __future__ import annotations

import io
import re
from itertools import pairwise
from types import SimpleNamespace

import pytest
from rich.console import Console

from qlora_cli.train.progress import RecentMean, RichProgress

# --- Item 3: the live training display ------------------------------------------------------------


def _state(max_steps=400):
    return SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=max_steps, log_history=[],
                           num_input_tokens_seen=0, epoch=0.0)


def _train(console, steps=86, seconds_per_step=9.0, max_steps=400):
    """Feed RichProgress the callbacks of a run of `steps` steps, a log every 10, one eval; return
    (the callback, its live line before it stopped)."""
    now = [0.0]
    progress = RichProgress(console, clock=lambda: now[0])
    state = _state(max_steps)
    progress.on_train_begin(None, state, None)
    for step in range(1, steps + 1):
        now[0] += seconds_per_step
        state.global_step, state.num_input_tokens_seen = step, step * 4096
        progress.on_step_end(None, state, None)
        if step % 10 == 0:
            progress.on_log(None, state, None, logs={"loss": 6.52 - step / 100, "learning_rate": 2e-4,
                                                     "grad_norm": 1.234, "epoch": step / 400})
    progress.on_log(None, state, None, logs={"eval_loss": 5.9})
    line = progress.line
    progress.on_train_end(None, state, None)
    return progress, line


def _frame(line, width) -> str:
    console = Console(width=width, record=True, force_terminal=True, file=io.StringIO())
    console.print(line)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 120, 200])
def test_live_line_keeps_step_count_and_eta_whole_at_every_width(width):
    console = Console(width=width, record=True, force_terminal=True, file=io.StringIO())
    _, line = _train(console)
    frame = _frame(line, width)
    # 86 steps at 9 s each: 314 steps left take 2,826 s.
    assert "86/400" in frame and "ETA 0:47:06" in frame, frame
    assert "…" not in frame
    assert all(len(row) <= width for row in frame.splitlines()), frame
    # The live console drew its frames (their cursor moves are not recorded, so they run together)
    # and left the final one.
    assert console.export_text().rstrip().endswith(frame.rstrip())
    assert "loss 5.72 (avg 5.77)" in frame  # the loss is one of the fields kept at 80 columns
    if width >= 200:  # room for every field
        assert "gnorm 1.234" in frame and "lr 2.00e-04" in frame and "eval 5.9" in frame


def test_narrow_terminals_drop_the_least_useful_fields_first():
    _, line = _train(Console(width=80, file=io.StringIO(), force_terminal=True))
    frames = {w: _frame(line, w) for w in (40, 60, 80, 100, 120, 160, 200)}
    order = ["loss 5.72", "step/s", "mem ", "tok/s", "eval 5.9", "lr 2.00e-04", "gnorm 1.234"]
    for w, frame in frames.items():
        shown = [field in frame for field in order]
        assert shown == sorted(shown, reverse=True), (w, frame)  # a field only when every more useful one is
        assert "86/400" in frame and "ETA 0:47:06" in frame and len(frame.rstrip("\n")) <= w
    assert "━" in frames[80]  # the bar is kept at 80 columns


def test_piped_console_gets_no_live_frames_only_the_plain_log_lines():
    out = io.StringIO()
    console = Console(width=80, file=out, force_terminal=False)
    progress, _ = _train(console, steps=20)
    assert progress.live is None
    assert out.getvalue().splitlines() == [
        "step 10/400  loss 6.42  learning_rate 0.0002  grad_norm 1.234",
        "step 20/400  loss 6.32  learning_rate 0.0002  grad_norm 1.234",
        "step 20/400  eval_loss 5.9",
    ]


def test_smoothed_loss_follows_a_drop_within_a_few_logs():
    mean = RecentMean()
    for _ in range(40):
        mean.add(4.0)
    for _ in range(3):
        mean.add(1.0)
    assert abs(mean.value - 1.0) < 0.05  # the old EMA (0.9 per log) said 3.19 here
    mean.add(float("nan"))  # a non-finite loss is left out, not averaged in
    assert abs(mean.value - 1.0) < 0.05


def test_smoothed_loss_in_the_display_is_close_to_the_loss_after_it_falls():
    progress = RichProgress(Console(file=io.StringIO(), force_terminal=False))
    state = _state()
    progress.on_train_begin(None, state, None)
    for step in range(1, 61):
        state.global_step = step
        progress.on_log(None, state, None, logs={"loss": 4.0 if step <= 50 else 0.996})
    assert re.search(r"avg 0\.99", progress.line.render(200).plain)


# --- Item 5: `qlora eval` shows progress, and small rates -----------------------------------------


def test_eval_table_shows_small_rates_with_significant_digits():
    from qlora_cli.infer.eval_results import render_table

    results = {"kind": "run", "base": None, "delta": None,
               "metrics": {"loss": 1.5, "loss_samples_per_s": 0.8123, "generate_samples_per_s": 0.019}}
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render_table(results))
    text = console.export_text()
    assert re.search(r"samples/s \(generating\)\s*│\s*0\.019 ", text), text
    assert re.search(r"samples/s \(scoring\)\s*│\s*0\.812 ", text), text


@pytest.fixture(scope="module")
def tiny_target(tiny):
    """The tiny model as a base target, and 24 fabricated rows with a response span each."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_cli.infer.target import Target, _ModelRef
    from qlora_cli.model.load import load_tokenizer

    tok = load_tokenizer(_ModelRef(str(tiny / "model")))
    model = AutoModelForCausalLM.from_pretrained(str(tiny / "model"), torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in range(24):
        ids = torch.randint(3, 200, (8 + n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 5 + ids[5:]})
    return Target("base", str(tiny / "model"), model.eval(), tok, None, None), rows


def test_scoring_reports_progress_on_stderr_and_nothing_on_stdout(tiny_target, capsys):
    from qlora_cli.infer.evaluate import score_tokens

    target, rows = tiny_target
    metrics = score_tokens(target, rows, batch_size=2, console=Console(stderr=True, force_terminal=False))
    out, err = capsys.readouterr()
    assert out == ""  # --json prints the results there: nothing else may
    lines = err.splitlines()
    # 12 batches of 2 rows, a line about every 1/10 of the rows (3 rows: every other batch), the last one always.
    assert lines[0].startswith("scoring 4/24 rows") and lines[-1].startswith("scoring 24/24 rows"), err
    assert 5 <= len(lines) <= 12
    assert metrics["response_tokens"] == sum(len(r["labels"]) - 5 for r in rows)


def test_scoring_on_a_terminal_draws_a_progress_bar(tiny_target):
    from qlora_cli.infer.evaluate import score_tokens

    target, rows = tiny_target
    console = Console(width=80, record=True, force_terminal=True, file=io.StringIO())
    score_tokens(target, rows, batch_size=8, console=console)
    text = console.export_text()
    assert "scoring" in text and "8/24 rows" in text and "24/24 rows" in text, text


def test_no_console_means_no_progress(tiny_target, capsys):
    from qlora_cli.infer.evaluate import score_tokens

    target, rows = tiny_target
    score_tokens(target, rows[:4], batch_size=2)
    assert capsys.readouterr() == ("", "")


# --- Item 14: `qlora data --stats` at 80 columns, its histogram, and `qlora plot`'s legend ---------

LONG_PATH = "/home/someone/projects/fine-tuning/datasets/customer-support/conversations-2024-train.jsonl"


def _stats():
    from qlora_cli.data.pipeline import DataStats, SourceStats, length_histogram

    return DataStats(
        sources=[SourceStats(path=LONG_PATH, rows=12345, bad_rows=3, truncated=120, dropped_no_response=2,
                             kept=12340, used=11000, held_out=1234)],
        val_sources=[SourceStats(path="data/val.jsonl", rows=500, kept=500, used=500)],
        train_rows=11000, val_rows=1234, train_tokens=123456, trained_tokens=100000,
        lengths={"min": 10, "p50": 25, "p90": 38, "p99": 40, "max": 40},
        histogram=length_histogram(list(range(10, 41)), 2048),
    )


def test_stats_table_fits_80_columns_with_whole_paths_and_headers():
    from qlora_cli.data.report import STATS_COLUMNS, render_stats

    console = Console(width=80, record=True, file=io.StringIO())
    console.print(render_stats(_stats(), SimpleNamespace(max_seq_len=2048, packing=False, on_too_long="truncate")))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in text
    header = next(line for line in lines if "source" in line and "rows" in line)
    for col in STATS_COLUMNS:
        assert re.search(rf"(^|┃) *{re.escape(col)} *(┃|$)", header), (col, header)
    # The path is wrapped over several lines of the first column, every character kept.
    first_column = "".join(line.split("│")[0].strip() for line in lines if "│" in line)
    assert LONG_PATH in first_column, text
    assert "12345" in text and "11000" in text


def test_length_histogram_spreads_short_data_over_several_bins():
    from qlora_cli.data.pipeline import length_histogram

    hist = length_histogram(list(range(10, 41)), max_seq_len=2048)
    assert hist[0][0] == 10 and hist[-1][1] == 40  # the data's own range, not 1..2048
    assert sum(c for *_, c in hist) == 31
    assert sum(1 for *_, c in hist if c) >= 6
    assert all(lo <= hi and hi + 1 == nxt for (lo, hi, _), (nxt, _, _) in pairwise(hist))


def test_length_histogram_caps_at_max_seq_len_and_handles_few_lengths():
    from qlora_cli.data.pipeline import length_histogram

    assert length_histogram([3000, 5, 100], max_seq_len=512)[-1][1] == 512
    assert sum(c for *_, c in length_histogram([3000, 5, 100], max_seq_len=512)) == 3
    assert length_histogram([7, 7, 8], max_seq_len=2048) == [[7, 7, 2], [8, 8, 1]]
    assert length_histogram([], max_seq_len=2048) == []


def test_plot_legend_of_several_runs_is_outside_the_curves(tmp_path):
    import json

    from qlora_cli.outputs.plots import draw_runs, plot_runs

    runs = []
    for name, scale in (("run-a", 1.0), ("run-b", 1.3), ("run-c", 0.8)):
        run = tmp_path / name
        run.mkdir()
        records = [{"step": s, "loss": scale * (3 - s / 50)} for s in range(1, 101)]
        records += [{"step": s, "eval_loss": scale * (3 - s / 50)} for s in (25, 50, 75, 100)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        runs.append(run)
    fig = draw_runs(runs)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes_box.x1  # beside the axes, so it covers no curve
    out = plot_runs(runs, tmp_path / "compare.png")
    assert out.read_bytes().startswith(b"\x89PNG")


# --- Issue 27, startup: something on the terminal before the libraries load -----------------------


def _run_on_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `python -m qlora_cli ARGS` with stdout and stderr on a pseudo-terminal, as a user's shell
    gives it; return its exit code and everything it wrote there, in order."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_cli", *args], stdin=subprocess.DEVNULL,
                            stdout=child_fd, stderr=child_fd, env={**os.environ, "COLUMNS": "200"})
    os.close(child_fd)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([main_fd], [], [], 0.5)[0]:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(main_fd)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow  # a 2-step training run in a fresh process
def test_train_names_what_it_loads_before_its_first_line(write_recipe, tmp_path):
    """The libraries, data and 4-bit model take seconds (minutes for a 7B) before train.run can say
    anything: a spinner names each step meanwhile, and it is gone before the announcement."""
    recipe = write_recipe({"train": {"max_steps": 2, "eval_steps": 2, "save_steps": 2}})
    code, out = _run_on_a_terminal(["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert code == 0, out[-3000:]
    announcement = out.index("LoRA r=")
    phases = ["loading torch, transformers, PEFT and TRL", "loading the tokenizer", "tokenizing the data",
              "in 4 bits", "attaching LoRA adapters"]
    where = [out.find(p) for p in phases]
    assert all(0 <= w < announcement for w in where), dict(zip(phases, where))
    assert where == sorted(where)  # in the order they happen
    assert out.index(phases[0]) < 50  # the first thing written (after at most a cursor control)
