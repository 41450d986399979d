"""Runs that stop early: SIGKILL then --resume, SIGINT/SIGTERM, damaged checkpoints, a NaN loss.

The runs that are stopped go through the real CLI in a subprocess (the signal is sent to it), and so
does the uninterrupted reference (with fake credentials in its environment from the start); the
resumes and the runs that fail inside the trainer go through the CLI's entry point in this process
(qlora_main). The promise under test: an interrupted run, resumed, ends with the same adapter
weights and the same per-step losses as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # training runs, killed, interrupted and resumed (make test-fast leaves them out)

# Short enough to be cheap, long enough that a kill after the first checkpoint lands mid-run.
CHANGES = {
    "lora": {"r": 8, "alpha": 16},
    "train": {"max_steps": 24, "batch_size": 8, "logging_steps": 1, "eval_steps": 12, "save_steps": 6,
              "save_total_limit": 2, "warmup_ratio": 0.0},
}


def _start(recipe, run_dir):
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _wait_for_checkpoint(proc, run_dir, step: int, timeout: float = 300):
    manifest = run_dir / "checkpoints" / f"checkpoint-{step}" / "qlora_manifest.json"
    deadline = time.monotonic() + timeout
    while not manifest.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # A resumed run also marks where it resumed ({"step", "resumed", "elapsed_s"}): not a logged step.
    return [(r["step"], r.get("loss"), r.get("eval_loss")) for r in records if not r.get("resumed")]


def _assert_same_run(run_dir, reference):
    a, b = load_file(run_dir / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)
    assert _losses(run_dir) == _losses(reference)  # every step logged once, with the same loss
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 24


@pytest.fixture(scope="module")
def recipe(tiny, tmp_path_factory):
    from conftest import recipe_file

    return recipe_file(tiny, tmp_path_factory.mktemp("resume_recipe"), CHANGES)


FAKE_TOKEN = "hf_qloraFakeTokenThatMustNeverBeWritten42"


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The same recipe, never interrupted; trained with fake credentials in the environment."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    secrets = {"HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "WANDB_API_KEY": FAKE_TOKEN}
    proc = run_cli("train", str(recipe), "--output-dir", str(run_dir), env=secrets)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


def test_credentials_never_reach_the_run_directory_or_the_console(reference):
    files = [p for p in reference.parent.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in files)  # the pickled arguments are checked too
    assert len(files) > 20
    for path in files:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_sigkill_then_resume_equals_the_uninterrupted_run(recipe, reference, tmp_path, qlora_main):
    run_dir = tmp_path / "run"
    proc = _start(recipe, run_dir)
    _wait_for_checkpoint(proc, run_dir, 6)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()  # killed mid-run, not after it

    resumed = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    _assert_same_run(run_dir, reference)
    # Checkpoints hold the adapter only: LoRA factors and the recipe's modules_to_save (the tiny
    # recipe trains embed_tokens and lm_head in full), never the 4-bit base's linear weights.
    for checkpoint in (run_dir / "checkpoints").glob("checkpoint-*"):
        keys = load_file(checkpoint / "adapter_model.safetensors").keys()
        assert keys and all("lora_" in k or k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in keys), keys
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-18", "checkpoint-24"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_saves_and_stops_then_resume_finishes_the_same_run(recipe, reference, tmp_path, sig, code,
                                                                       qlora_main):
    run_dir = tmp_path / "run"
    proc = _start(recipe, run_dir)
    _wait_for_checkpoint(proc, run_dir, 6)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "--resume" in stderr and "The last checkpoint is" in stderr
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*"))
    stopped_at = json.loads((run_dir / "checkpoints" / f"checkpoint-{saved[-1]}" / "trainer_state.json").read_text())
    assert 6 < saved[-1] < 24 and stopped_at["global_step"] == saved[-1]  # saved where it stopped, not at save_steps
    assert not (run_dir / "summary.json").exists()

    resumed = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(run_dir, reference)


def test_second_signal_exits_at_once(recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(recipe, run_dir)
    _wait_for_checkpoint(proc, run_dir, 6)
    proc.send_signal(signal.SIGINT)
    # Two signals sent back to back arrive as one; the second Ctrl-C of a person comes after the
    # first was acknowledged, so wait for that message.
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "finishing this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()  # not communicate(): it would skip what the line reader has buffered
    proc.wait(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "SIGINT again: stopped at once" in stderr
    assert "The last checkpoint is" in stderr and "--resume" in stderr


def test_damaged_checkpoints_are_skipped_or_refused(recipe, reference, tmp_path, qlora_main):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()
    newest = run_dir / "checkpoints" / "checkpoint-24" / "adapter_model.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)

    resumed = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping" in resumed.stderr and "checkpoint-24" in resumed.stderr and "truncated" in resumed.stderr
    assert "checkpoint-18" in resumed.stderr
    _assert_same_run(run_dir, reference)  # steps 19-24 trained again, to the same weights

    for optimizer in (run_dir / "checkpoints").glob("checkpoint-*/optimizer.pt"):
        optimizer.write_bytes(b"garbage")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    refused = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "no whole checkpoint to resume from" in refused.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # nothing deleted


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoints(recipe, tmp_path, qlora_main, monkeypatch):
    # train.learning_rate is bounded (config.py) below what overflows this model, so the NaN is
    # injected instead: step 8's loss (after checkpoint-6) comes out NaN, as from an overflow.
    from qlora_cli.train.checkpoints import checkpoints_in
    from qlora_cli.train.trainer import CheckpointingTrainer

    compute_loss = CheckpointingTrainer.compute_loss

    def nan_at_step_8(self, model, inputs, *args, **kwargs):
        loss = compute_loss(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step == 7 else loss

    monkeypatch.setattr(CheckpointingTrainer, "compute_loss", nan_at_step_8)
    run_dir = tmp_path / "run"
    proc = qlora_main("train", str(recipe), "--output-dir", str(run_dir))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "loss is nan at step 8" in proc.stderr and "Nothing from that step was applied" in proc.stderr
    assert "train.learning_rate" in proc.stderr
    assert "The last checkpoint is" in proc.stderr and "checkpoint-6" in proc.stderr
    assert [p.name for p in checkpoints_in(run_dir / "checkpoints")] == ["checkpoint-6"]
    assert not (run_dir / "summary.json").exists()


def test_resume_bad_input(recipe, reference, tmp_path, qlora_main):
    def refused(*args, needle):
        proc = qlora_main("train", str(recipe), *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr

    refused("--output-dir", str(tmp_path / "new"), "--resume", needle="nothing to resume")
    assert not (tmp_path / "new").exists()
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    refused("--output-dir", str(run_dir), "--resume", "--set", "lora.r=4", needle="lora.r")
    refused("--output-dir", str(run_dir), "--resume", "--overwrite", needle="give one of them")
    refused("--output-dir", str(run_dir), "--resume", str(tmp_path), needle="not a checkpoint")
    refused("--output-dir", str(run_dir), "--resume", str(reference / "checkpoints" / "checkpoint-24"),
            needle="not a checkpoint of")
    refused("--output-dir", str(run_dir), needle="--overwrite")  # an existing run is never trained over silently
    assert _losses(run_dir) == _losses(reference)  # and nothing in it was touched
