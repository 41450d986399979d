"""loss.png: train loss (raw and smoothed) and eval loss against step, for one run or several.

    plot_runs([Path("runs/a"), Path("runs/b")], Path("compare.png"))

Drawn with matplotlib's Agg backend (no display needed over SSH), from each run's metrics.jsonl.
"""

from __future__ import annotations

from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.outputs.run_dir import METRICS, RunDir
from qlora_cli.util.files import write_atomically


def read_curves(run: Path) -> dict:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)]} from RUN/metrics.jsonl."""
    if not (Path(run) / METRICS).is_file():
        raise UserError.single("RUN", f"{run} has no {METRICS}: give a run directory written by `qlora train`")
    records = RunDir(run).read_metrics()
    return {"train": [(r["step"], r["loss"]) for r in records if "loss" in r],
            "eval": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]}


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average over a window of about 1/20 of the points (so a 40-step run and a
    4,000-step run look equally smooth), debiased at the start as TensorBoard does."""
    a = 1 - 1 / max(2.0, len(values) / 20)
    out, current = [], 0.0
    for i, v in enumerate(values, start=1):
        current = a * current + (1 - a) * v
        out.append(current / (1 - a**i))
    return out


def plot_runs(runs: list[Path], output: Path) -> Path:
    """Draw every run on one figure; write it atomically to `output`."""
    fig = draw_runs(runs)
    output = Path(output)
    try:
        # "tight" grows the image to take in a legend placed outside the axes.
        write_atomically(output, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    except OSError as exc:
        raise UserError.single("--output", f"cannot write {output}: {exc.strerror}") from None
    return output


def draw_runs(runs: list[Path]):
    """The figure of plot_runs.

    A bare Figure, not pyplot's: pyplot keeps a registry of open figures and picks a GUI backend,
    neither of which a file needs, and importing it costs about 0.2 s more at the end of every run.
    The garbage collector frees the figure."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)  # Agg draws it: no display needed over SSH
    ax = fig.subplots()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        curves, color = read_curves(run), colors[i % len(colors)]
        name = Path(run).name if len(runs) > 1 else "train"
        if curves["train"]:
            steps, losses = zip(*curves["train"])
            ax.plot(steps, losses, color=color, alpha=0.3, linewidth=1, label=f"{name} loss")
            ax.plot(steps, smooth(list(losses)), color=color, linewidth=2, label=f"{name} loss (smoothed)")
        if curves["eval"]:
            steps, losses = zip(*curves["eval"])
            ax.plot(steps, losses, color=color, linestyle="--", marker="o", markersize=4,
                    label=f"{Path(run).name + ' ' if len(runs) > 1 else ''}eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(runs[0]).name if len(runs) == 1 else "loss")
    ax.grid(alpha=0.3)
    if len(runs) > 1:
        # Several runs make a legend of 2-3 entries each, taller than the curves leave free anywhere
        # inside the axes: it goes to the right of them, where it covers nothing.
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    else:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig
