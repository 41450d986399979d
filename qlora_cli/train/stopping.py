"""How a training run stops when asked: the whole protocol in one place.

- One process (`qlora train`): the first SIGINT/SIGTERM finishes the current optimizer step, saves
  a checkpoint and stops (exit 128 + signal); a second stops at once without saving (GracefulStop).
- Under a launcher (torchrun, accelerate launch): each rank gets the terminal's Ctrl-C on its own,
  not always within the same step, so after every step the ranks agree on the signal with one tiny
  all-reduce (agreed_signal) and stop and save at the same step.
- `qlora train --nproc N` keeps its workers out of the terminal's signals and relays a stop through
  a file named in QLORA_STOP_FILE (relayed_stops), which every rank checks after each step; the
  workers then exit 0 and the launching process exits with the signal's code (worker_exit_code).
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from qlora_cli.errors import StoppedRun
from qlora_cli.train import distributed

STOP_FILE_ENV = "QLORA_STOP_FILE"


class GracefulStop(TrainerCallback):
    """First SIGINT/SIGTERM: save and stop after the current optimizer step. Second: stop now."""

    def __init__(self, say=None, where_to_continue=lambda: ""):
        self.signum: int | None = None
        self.say = say or (lambda text: None)
        self.where_to_continue = where_to_continue  # "The last checkpoint is ... To continue: ..."
        self._previous = {}
        self._first = 0.0

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and distributed.world_size() > 1 and time.monotonic() - self._first < 1.0:
            # torchrun and accelerate launch forward the terminal's Ctrl-C to workers that already
            # got it from the terminal: the same press, not a second one. (A single process has no
            # such echo, so there a second press counts however fast it comes.)
            return
        if self.signum is not None:
            self.uninstall()
            raise StoppedRun(128 + signum, f"{signal.Signals(signum).name} again: stopped at once, without saving. "
                             + self.where_to_continue())
        self.signum, self._first = signum, time.monotonic()
        self._announce()

    def _announce(self) -> None:
        if distributed.is_main_process():
            self.say(f"{signal.Signals(self.signum).name}: finishing this step and saving a checkpoint "
                     "(press Ctrl-C again to stop at once, without one)")

    def on_step_end(self, args, state, control, **kwargs):
        # `qlora train --nproc` keeps its processes out of the terminal's signals (relayed_stops)
        # and asks them to stop through a file instead.
        stop_file = os.environ.get(STOP_FILE_ENV)
        if self.signum is None and stop_file and os.path.exists(stop_file):
            self.signum = int(Path(stop_file).read_text() or signal.SIGINT)
            self._announce()
        # Under a launcher the ranks agree first (one tiny all-reduce per step), so they all stop
        # and save at the same step.
        self.signum = agreed_signal(self.signum, args.device)
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def agreed_signal(signum: int | None, device) -> int | None:
    """The stop signal any rank has seen, on every rank (all ranks must call this at the same step).

    A Ctrl-C reaches each process on its own, and not always within the same step. A rank that
    stopped alone would wait forever for the others in the checkpoint barrier, while they wait
    for it in the next gradient all-reduce.
    """
    import torch
    import torch.distributed as dist

    if distributed.world_size() == 1 or not dist.is_initialized():
        return signum
    tensor = torch.tensor([signum or 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item()) or None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


@contextmanager
def relayed_stops(start):
    """Around `qlora train --nproc`'s launch: START(env) starts the launcher with the stop file's
    name added to its environment (in its own session, out of reach of the terminal's Ctrl-C:
    torchrun would otherwise take the signal too, kill the workers 30 s later whatever they were
    writing, and print its own traceback). Here the first Ctrl-C (or SIGTERM) writes the stop file,
    which every rank checks after each step (GracefulStop): they save a checkpoint, stop together
    and exit 0; the second kills the launch at once. Checkpoints are atomic either way.
    Yields (process, signals asked), the latter empty unless the user asked to stop."""
    import tempfile

    stop_file = Path(tempfile.mkdtemp(prefix="qlora-stop-")) / "stop"
    process = start({STOP_FILE_ENV: str(stop_file)})
    asked: list[int] = []

    def on_signal(signum, frame):
        asked.append(signum)
        if len(asked) == 1:
            stop_file.write_text(str(signum))
        else:
            os.killpg(process.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield process, asked
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_file.unlink(missing_ok=True)
        stop_file.parent.rmdir()


def worker_exit_code(exc: StoppedRun) -> int:
    """The exit code of a process that stopped. A worker of `qlora train --nproc` stopped by the
    relay exits 0: the launching process exits with the signal's code itself, and a worker exiting
    non-zero would make the launcher print a failure report over the message."""
    return 0 if exc.graceful and os.environ.get(STOP_FILE_ENV) else exc.exit_code
