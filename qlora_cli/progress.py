"""Trainer callbacks: the live progress display and metrics.jsonl.

Both hook into transformers' callback system rather than wrapping the loop, so the loop itself
stays TRL's. They only act on the main process, so a multi-process run prints and writes once.
"""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

# The trainer's final aggregate log carries "train_loss" (step logs carry "loss"); it belongs in
# summary.json, not in the step log.
_END_OF_TRAINING_KEYS = {"train_loss"}


class MetricsLog(TrainerCallback):
    """Append one JSON object per logging/evaluation step to RUN/metrics.jsonl, with throughput."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._t0 = None
        self._last = (None, 0)  # (time, tokens) at the previous train log

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._last = (self._t0, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or _END_OF_TRAINING_KEYS & logs.keys():
            return
        now = time.perf_counter()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: v for k, v in logs.items() if k != "epoch"})
        if "loss" in logs:
            then, tokens = self._last
            seen = state.num_input_tokens_seen
            if now > then:
                record["tokens_per_second"] = round((seen - tokens) / (now - then), 1)
            self._last = (now, seen)
        record["elapsed_s"] = round(now - self._t0, 3)
        self.run_dir.append_metrics(record)


class RichProgress(TrainerCallback):
    """A progress bar with step, loss, learning rate, tokens/s and ETA, plus one line per log."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self._t0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=state.max_steps, loss="-", lr="-", tps="-")
        self.progress.start()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        tps = state.num_input_tokens_seen / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.task, completed=state.global_step, tps=f"{tps:,.0f}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or _END_OF_TRAINING_KEYS & logs.keys():
            return
        if "loss" in logs:
            self.progress.update(self.task, loss=_fmt(logs["loss"]), lr=f"{logs.get('learning_rate', 0):.2e}")
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{k} {_fmt(v)}" for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")]
        self.progress.console.print("  ".join(parts), highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)
