"""Faults injected into real training runs: a disk that fills up while a checkpoint is written, and
a graceful stop between two logging steps; after each, --resume must end as the run that never
failed (every logged number, and the adapter).

The faulty runs go through the CLI's entry point in this process (qlora_main), where torch.save and
the step can be intercepted; the uninterrupted reference runs as a user runs it, in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from qlora_cli.train import checkpoints

pytestmark = pytest.mark.slow  # training runs, failed and resumed (make test-fast leaves them out)

# Logs at steps 1 (the first step is always logged), 4, 8 and 12; checkpoints at 3, 6, 9 and 12:
# every checkpoint but the last is taken between two logging steps.
CHANGES = {
    "lora": {"r": 8, "alpha": 16},
    "train": {"max_steps": 12, "batch_size": 8, "logging_steps": 4, "eval_steps": 12, "save_steps": 3,
              "save_total_limit": 2, "warmup_ratio": 0.0},
}
# What a full disk does to torch.save (seen with the run directory on a full tmpfs): part of the
# file is written, then PyTorch's zip writer raises this RuntimeError, not an OSError.
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 674048 vs 673936"


@pytest.fixture(scope="module")
def recipe(tiny, tmp_path_factory):
    from conftest import recipe_file

    return recipe_file(tiny, tmp_path_factory.mktemp("faults_recipe"), CHANGES)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The same recipe, never interrupted."""
    run_dir = tmp_path_factory.mktemp("faults_reference") / "run"
    proc = run_cli("train", str(recipe), "--output-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def _logged(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl without its timings: loss, grad norm, learning rate, token
    counts, entropy and accuracy, eval loss."""
    timing = ("runtime", "per_second", "elapsed_s")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # A resumed run also marks where it resumed ({"step", "resumed", "elapsed_s"}): not a logged step.
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in records if not r.get("resumed")]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    assert _logged(run_dir) == _logged(reference)
    a, b = load_file(run_dir / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def _checkpoint_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def test_graceful_stop_between_logs_then_resume_logs_what_the_uninterrupted_run_logs(
        recipe, reference, tmp_path, qlora_main, monkeypatch):
    from qlora_cli.train.stopping import GracefulStop

    run_dir = tmp_path / "run"
    on_step_end = GracefulStop.on_step_end

    def sigterm_during_step_5(self, args, state, control, **kwargs):
        if state.global_step == 5:  # between the logs of steps 4 and 8
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by GracefulStop's own handler
        return on_step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(GracefulStop, "on_step_end", sigterm_during_step_5)
        stopped = qlora_main("train", recipe, "--output-dir", run_dir)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM after step 5" in stopped.stderr
    assert checkpoints.problem(run_dir / "checkpoints" / "checkpoint-5") is None

    resumed = qlora_main("train", recipe, "--output-dir", run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-5" in resumed.stderr
    _assert_same_run(run_dir, reference)  # the log at step 8 averages steps 5-8, as without the stop

    # What made that possible: checkpoint-9 (like checkpoint-5) holds the loss summed since the log
    # at step 8, and its manifest hashes that file like every other.
    checkpoint = run_dir / "checkpoints" / "checkpoint-9"
    window = json.loads((checkpoint / checkpoints.LOG_WINDOW).read_text())
    assert window["global_step"] == 9 and window["last_logged_step"] == 8 and window["loss_sum"] > 0
    assert checkpoints.LOG_WINDOW in json.loads((checkpoint / checkpoints.MANIFEST).read_text())["files"]


def _full_disk(patch, run_dir: Path, failing: str, message: str, free: int) -> None:
    """torch.save of `failing` (a checkpoint's file, e.g. checkpoint-6/optimizer.pt) writes part of
    the file and raises RuntimeError(message); the run directory's filesystem then has `free` bytes."""
    real_save, real_usage = torch.save, shutil.disk_usage

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and Path(f).parts[-2:] == tuple(failing.split("/")):
            Path(f).write_bytes(b"PK\x03\x04" + bytes(4096))
            raise RuntimeError(message)
        return real_save(obj, f, *args, **kwargs)

    def disk_usage(path):
        if Path(path).resolve().is_relative_to(run_dir.resolve()):
            return real_usage(path)._replace(free=free)
        return real_usage(path)

    patch.setattr(torch, "save", save)
    patch.setattr(shutil, "disk_usage", disk_usage)


def test_disk_full_in_torch_save_stops_with_the_disk_message_then_resume_finishes(
        recipe, reference, tmp_path, qlora_main, monkeypatch):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _full_disk(patch, run_dir, "checkpoint-6/optimizer.pt", TORCH_DISK_FULL, free=0)
        full = qlora_main("train", recipe, "--output-dir", run_dir)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    assert "No space left on device" in full.stderr and "Free space" in full.stderr
    assert "The last checkpoint is" in full.stderr and "checkpoint-3" in full.stderr and "--resume" in full.stderr
    # The half-written checkpoint-6 is gone (no staging copy either); checkpoint-3 is whole.
    assert _checkpoint_dirs(run_dir) == ["checkpoint-3"]
    assert checkpoints.problem(run_dir / "checkpoints" / "checkpoint-3") is None
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter_model.safetensors").exists()

    resumed = qlora_main("train", recipe, "--output-dir", run_dir, "--resume")  # space freed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-3" in resumed.stderr
    _assert_same_run(run_dir, reference)


def test_a_write_failure_with_space_left_names_pytorchs_error(recipe, tmp_path, qlora_main, monkeypatch):
    # Space left, yet torch.save's stream failed: a quota or a failing disk. Still the disk message
    # (only the file's write fails this way; any other RuntimeError stays a bug: the test below),
    # naming PyTorch's own error.
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _full_disk(patch, run_dir, "checkpoint-3/optimizer.pt", "basic_ios::clear: iostream error", free=50 * 2**30)
        failed = qlora_main("train", recipe, "--output-dir", run_dir)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert "PyTorch could not write the file (basic_ios::clear: iostream error; 50.0 GiB free" in failed.stderr
    assert "No checkpoint was written yet" in failed.stderr
    assert _checkpoint_dirs(run_dir) == []  # nothing half written


def test_write_failure_recognises_library_write_errors_only(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    full = checkpoints.write_failure(
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), tmp_path)
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC and full.filename == str(tmp_path)
    staged = tmp_path / "checkpoints" / ".staging" / "checkpoint-6"  # free space is read where it exists
    for free, expected in [(1000, errno.ENOSPC), (50 * 2**30, errno.EIO)]:
        _full_disk(monkeypatch, tmp_path, "none/none", "", free=free)
        assert checkpoints.write_failure(RuntimeError(TORCH_DISK_FULL), staged).errno == expected
    assert checkpoints.write_failure(RuntimeError("CUDA error: an illegal memory access"), tmp_path) is None
    assert checkpoints.write_failure(SafetensorError("invalid header"), tmp_path) is None
    assert checkpoints.write_failure(OSError(28, "No space left on device"), tmp_path) is None  # already an OSError
