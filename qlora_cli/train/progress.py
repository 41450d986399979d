"""Trainer callbacks that show a run as it goes: the live display, and --log-format json lines.

Both hook into transformers' callback system rather than wrapping the loop, so the loop itself
stays TRL's. They only act on the main process, so a multi-process run prints and writes once.
"""

from __future__ import annotations

import json
import math
import time

from rich.console import Console
from rich.live import Live
from rich.text import Text
from transformers import TrainerCallback

from qlora_cli.train.metrics_log import END_OF_TRAINING_KEYS


class RichProgress(TrainerCallback):
    """One live line: progress bar, step N/M, ETA, loss (current and smoothed), steps/s, peak memory,
    tokens/s, last eval loss, learning rate and grad norm; plus one plain line per log for the
    scrollback (over SSH, the line history is what one reads when coming back).

    The line is laid out for the console's width each time it is drawn (TrainingLine): narrower
    terminals drop the least useful fields, then shrink the bar, but never cut N/M or the ETA.
    When the console is not a terminal (piped to a file), no live frames are drawn at all: the plain
    lines are the whole record, and a file gets no half-drawn final frame.
    """

    def __init__(self, console: Console | None = None, clock=time.perf_counter):
        self.console = console or Console(stderr=True)
        self.clock = clock  # injectable, so tests can fix the step rate and the ETA
        self.live: Live | None = None
        self.line: TrainingLine | None = None
        self._t0 = 0.0
        self._start_step = 0
        self.smoother = RecentMean()

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.line = TrainingLine(total=state.max_steps, completed=state.global_step,
                                 mem=format_memory(peak_memory_gib()))
        if self.console.is_terminal:
            # Live redraws the line 4 times a second from its fields; the callbacks only set them.
            self.live = Live(self.line, console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        self._t0 = self.clock()
        self._start_step = state.global_step  # a resumed run starts part-way

    def on_step_end(self, args, state, control, **kwargs):
        if self.line is None:
            return
        elapsed = self.clock() - self._t0
        steps = state.global_step - self._start_step
        line = self.line
        line.completed = state.global_step
        line.mem = format_memory(peak_memory_gib())
        if elapsed > 0:
            line.tps = f"{(state.num_input_tokens_seen or 0) / elapsed:,.0f}"
            line.rate = steps / elapsed

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.line is None or not logs or END_OF_TRAINING_KEYS & logs.keys():
            return
        line = self.line
        if "loss" in logs:
            loss = logs["loss"]
            self.smoother.add(loss)
            line.loss, line.smooth = _fmt(loss), _fmt(self.smoother.value)
            line.lr = f"{logs.get('learning_rate', 0):.2e}"
            line.gnorm = _fmt(logs.get("grad_norm", "-"))
        if "eval_loss" in logs:
            line.eval = _fmt(logs["eval_loss"])
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{k} {_fmt(v)}" for k, v in logs.items() if k in PLAIN_LINE_KEYS]
        self.console.print("  ".join(parts), highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """End the live display (also when training stops by an exception: a signal, a NaN)."""
        if self.live is not None:
            self.live.stop()  # leaves the last frame on the terminal
            self.live = None
        self.line = None


class RecentMean:
    """The smoothed loss: the mean of the last few logged losses, the window about 1/20 of the logs
    so far (at least 2), like loss.png's curve (plots.smooth). A fixed-weight EMA over logs lagged far
    behind a fast-falling loss (avg 3.98 when the loss was 1.0); this window follows the run, so
    after a drop the average reaches the new level within a window's worth of logs."""

    def __init__(self):
        self.values: list[float] = []

    def add(self, loss) -> None:
        if isinstance(loss, (int, float)) and math.isfinite(loss):  # a NaN would poison every later mean
            self.values.append(float(loss))

    @property
    def value(self) -> float | None:
        if not self.values:
            return None
        window = self.values[-max(2, math.ceil(len(self.values) / 20)):]
        return sum(window) / len(window)


class TrainingLine:
    """The live line, a rich renderable laid out for the width it is given.

    Always: "N/M" and "ETA h:mm:ss", whole. Then, while they fit: the "train" label, the loss with
    its average, steps/s, memory, tokens/s, eval loss, learning rate and grad norm, in that order
    of usefulness; a bar of up to BAR_MAX cells takes what is left (at least BAR_MIN, else none).
    At 80 columns that is the bar, N/M, the loss, steps/s, memory and the ETA.
    """

    BAR_MAX, BAR_MIN, BAR_WANTED = 24, 8, 12  # optional fields give way before the bar drops below BAR_WANTED

    def __init__(self, total: int, completed: int = 0, mem: str = "-"):
        self.total, self.completed, self.mem = total, completed, mem
        self.rate: float | None = None  # steps/s since this process started
        self.loss = self.smooth = self.lr = self.gnorm = self.eval = self.tps = "-"

    def eta(self) -> str:
        left = max(0, (self.total or 0) - self.completed)
        if not self.rate:
            return "ETA -:--:--"
        seconds = int(left / self.rate)
        return f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def fields(self) -> list[tuple[str, str]]:
        """(text, style) of the optional fields, most useful first."""
        return [
            (f"loss {self.loss} (avg {self.smooth})", "bold"),
            (f"{self.rate:.2f} step/s" if self.rate is not None else "- step/s", ""),
            (f"mem {self.mem}", ""),
            (f"{self.tps} tok/s", ""),
            (f"eval {self.eval}", ""),
            (f"lr {self.lr}", "dim"),
            (f"gnorm {self.gnorm}", "dim"),
        ]

    def layout(self, width: int) -> tuple[int, list[tuple[str, str]]]:
        """(bar width, fields shown): the fixed parts first, then fields while they fit."""
        sep = 2
        count, eta = f"{self.completed}/{self.total}", self.eta()
        used = len(count) + sep + len(eta)
        shown: list[tuple[str, str]] = []
        candidates = [("train", "bold"), *self.fields()]
        for text, style in candidates:
            if used + sep + len(text) + sep + self.BAR_WANTED > width:
                break  # in order: a less useful field never shows when a more useful one did not fit
            shown.append((text, style))
            used += sep + len(text)
        room = width - used - sep
        bar = min(self.BAR_MAX, room) if room >= self.BAR_MIN else 0
        return bar, shown

    def render(self, width: int) -> Text:
        bar, shown = self.layout(width)
        label = shown[:1] if shown and shown[0][0] == "train" else []
        text = Text(no_wrap=True, overflow="ellipsis")
        for part, style in label:
            text.append(part, style=style).append("  ")
        if bar:
            done = round(bar * min(1.0, self.completed / self.total)) if self.total else 0
            text.append("━" * done, style="green").append("━" * (bar - done), style="grey23").append("  ")
        text.append(f"{self.completed}/{self.total}", style="cyan")
        for part, style in shown[len(label):]:
            text.append("  ").append(part, style=style)
        text.append("  ").append(self.eta(), style="cyan")
        return text

    def __rich_console__(self, console, options):
        yield self.render(options.max_width)


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


# What each plain log line shows; the preference methods' reward accuracy and margin (TRL's names) too.
PLAIN_LINE_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "rewards/accuracies", "rewards/margins",
                   "eval_rewards/accuracies", "eval_rewards/margins")


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
