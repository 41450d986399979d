"""Trainer callbacks that show a run as it goes: the live display, and --log-format json lines.

Both hook into transformers' callback system rather than wrapping the loop, so the loop itself
stays TRL's. They only act on the main process, so a multi-process run prints and writes once.
"""

from __future__ import annotations

import json
import math
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from qlora_cli.train.metrics_log import END_OF_TRAINING_KEYS


class RichProgress(TrainerCallback):
    """One live display: progress, steps/s, tokens/s, ETA, loss (current and smoothed), learning
    rate, grad norm, last eval loss and peak memory; plus one plain line per log for the scrollback
    (over SSH, the line history is what one reads when coming back)."""

    SMOOTHING = 0.9  # exponential moving average of the logged loss (loss.png uses a debiased one: plots.py)

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None
        self._t0 = 0.0
        self._start_step = 0
        self.smoothed: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[sps]} step/s  {task.fields[tps]} tok/s"),
            TextColumn("loss {task.fields[loss]} (avg {task.fields[smooth]})"),
            TextColumn("lr {task.fields[lr]}  gnorm {task.fields[gnorm]}  eval {task.fields[eval]}"),
            TextColumn("mem {task.fields[mem]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", smooth="-", lr="-", gnorm="-",
            eval="-", tps="-", sps="-", mem=format_memory(peak_memory_gib()),
        )
        self.progress.start()
        self._t0 = time.perf_counter()
        self._start_step = state.global_step  # a resumed run starts part-way

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        steps = state.global_step - self._start_step
        tps = state.num_input_tokens_seen / elapsed if elapsed > 0 else 0.0
        self.progress.update(
            self.task, completed=state.global_step, tps=f"{tps:,.0f}",
            sps=f"{steps / elapsed:.2f}" if elapsed > 0 else "-", mem=format_memory(peak_memory_gib()),
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs or END_OF_TRAINING_KEYS & logs.keys():
            return
        if "loss" in logs:
            loss = logs["loss"]
            if math.isfinite(loss):
                a = self.SMOOTHING
                self.smoothed = loss if self.smoothed is None else a * self.smoothed + (1 - a) * loss
            self.progress.update(
                self.task, loss=_fmt(loss), smooth=_fmt(self.smoothed), lr=f"{logs.get('learning_rate', 0):.2e}",
                gnorm=_fmt(logs.get("grad_norm", "-")),
            )
        if "eval_loss" in logs:
            self.progress.update(self.task, eval=_fmt(logs["eval_loss"]))
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{k} {_fmt(v)}" for k, v in logs.items() if k in ("loss", "eval_loss", "learning_rate", "grad_norm")]
        self.progress.console.print("  ".join(parts), highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """End the live display (also when training stops by an exception: a signal, a NaN)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class JsonLines(TrainerCallback):
    """--log-format json: one JSON object per log on stdout, for scripts and CI."""

    def __init__(self, stream=None):
        import sys

        self.stream = stream or sys.stdout

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or END_OF_TRAINING_KEYS & logs.keys():
            return
        record = {"event": "log", "step": state.global_step, "max_steps": state.max_steps,
                  "epoch": round(state.epoch or 0.0, 4), **{k: v for k, v in logs.items() if k != "epoch"}}
        record["peak_memory_gib"] = round(peak_memory_gib(), 3)
        print(json.dumps(record, default=str), file=self.stream, flush=True)


def peak_memory() -> dict:
    """Peak accelerator memory when on a GPU, and the process's peak resident memory in any case."""
    import resource

    import torch

    out = {"cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        out["gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return out


def peak_memory_gib() -> float:
    """The one number the display shows: GPU memory allocated on a GPU, else peak resident memory."""
    peak = peak_memory()
    return peak.get("gpu_allocated_gib", peak["cpu_rss_gib"])


def format_memory(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.0f} MiB"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)
