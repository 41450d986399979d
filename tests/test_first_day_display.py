"""Issue 24, items 3, 5 and 14: what a new user sees while things run, at the width of their terminal.

  - the live training line at 80, 120 and 200 columns: N/M and the ETA always whole, no line wider
    than the terminal; no live frames when piped; a smoothed loss that follows the run;
  - `qlora eval`: progress on stderr while scoring, small rates shown with significant digits;
  - `qlora data --stats` at 80 columns, its length histogram, and the legend of `qlora plot`.
"""

from __future__ import annotations

import io
import re
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
