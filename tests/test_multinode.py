"""Two machines simulated on this one (issue 29): one CPU process per "machine", each its node's local
rank 0, over loopback (gloo), launched as the README says with configs/accelerate/multi_node.yaml.

- On a shared filesystem (both "machines" write the same output.dir): both exit 0, one set of
  checkpoints (written by global rank 0, with both ranks' RNG states), the same adapter on both ranks,
  and a run killed on both machines resumes to exactly the uninterrupted run's adapter.
- With a disk per machine (each "machine" in its own working directory, output.dir relative): each
  machine keeps a whole checkpoint of its own (save_on_each_node).
- accelerate's --cpu launcher across machines sets no RANK/WORLD_SIZE: refused before anything runs.

The launches take a few minutes on two cores: they are marked `multinode` (make test-multinode, run by
.ci/run after the default suite); the launch check is in the default suite.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, tiny_recipe

STEPS = 4


def _recipe(tiny, folder: Path, output: str) -> Path:
    raw = tiny_recipe(tiny, Path(output))
    raw["output"]["dir"] = output  # as given: relative paths make a disk per "machine"
    raw["train"].update(max_steps=STEPS, save_steps=1, logging_steps=1, save_total_limit=STEPS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _launch(recipe: Path, cwds: tuple[Path, Path], *args: str) -> list[subprocess.Popen]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for machine, cwd in enumerate(cwds):
        command = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "configs/accelerate/multi_node.yaml"),
            "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--num_machines", "2", "--num_processes", "2", "--multi_gpu",  # torchrun: CPU processes too
            "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "qlora_cli", "train", str(recipe), "--quiet", *args,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def _finish(procs, timeout: float = 300) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


def _adapter(run: Path) -> dict:
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def shared(tiny, tmp_path_factory):
    """An uninterrupted two-machine run on one filesystem: (run dir, outputs)."""
    tmp = tmp_path_factory.mktemp("multinode")
    recipe = _recipe(tiny, tmp, str(tmp / "run"))
    outputs = _finish(_launch(recipe, (tmp, tmp)))
    return tmp / "run", outputs, recipe


@pytest.mark.multinode
def test_two_machines_on_a_shared_disk_write_one_set_of_checkpoints(shared):
    run, outputs, _ = shared
    assert [code for code, _ in outputs] == [0, 0], "\n".join(out[-3000:] for _, out in outputs)
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{s}" for s in range(1, STEPS + 1)]  # one set, every step, all whole
    assert not (run / "checkpoints" / ".staging").exists()
    for checkpoint in (run / "checkpoints").glob("checkpoint-*"):
        assert {"rng_state_0.pth", "rng_state_1.pth", "qlora_manifest.json"} <= {p.name for p in checkpoint.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2
    assert summary["distributed"]["replicas_identical"] is True  # the adapter is equal on both ranks


@pytest.mark.multinode
def test_a_run_killed_on_both_machines_resumes_to_the_same_adapter(shared, tiny, tmp_path):
    reference, _, _ = shared
    recipe = _recipe(tiny, tmp_path, str(tmp_path / "run"))
    procs = _launch(recipe, (tmp_path, tmp_path))
    deadline = time.monotonic() + 240
    while not (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint-2 to kill at"
        time.sleep(0.1)
    for p in procs:  # both machines die at once, without a graceful stop
        os.killpg(p.pid, signal.SIGKILL)
    _finish(procs)
    outputs = _finish(_launch(recipe, (tmp_path, tmp_path), "--resume"))
    assert [code for code, _ in outputs] == [0, 0], "\n".join(out[-3000:] for _, out in outputs)
    resumed, uninterrupted = _adapter(tmp_path / "run"), _adapter(reference)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (resumed[name] - tensor).abs().max().item() < 1e-6, name


@pytest.mark.multinode
def test_machines_with_a_disk_each_keep_a_whole_checkpoint_each(tiny, tmp_path):
    machines = (tmp_path / "machine0", tmp_path / "machine1")
    recipe = _recipe(tiny, tmp_path, "run")  # relative: each "machine" writes under its own cwd
    for folder in machines:
        folder.mkdir()
    outputs = _finish(_launch(recipe, machines))
    assert [code for code, _ in outputs] == [0, 0], "\n".join(out[-3000:] for _, out in outputs)
    assert "do not share" in outputs[0][1]
    for machine, folder in enumerate(machines):
        last = folder / "run" / "checkpoints" / f"checkpoint-{STEPS}"
        names = {p.name for p in last.iterdir()}
        assert {"adapter_model.safetensors", "optimizer.pt", "qlora_manifest.json", f"rng_state_{machine}.pth"} <= names
    assert (machines[0] / "run" / "adapter_model.safetensors").is_file()  # the run's files: rank 0's machine


@pytest.mark.parametrize("env", [{"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_USE_CPU": "True"}])
def test_a_launch_across_machines_that_forms_no_process_group_is_refused(write_recipe, qlora_main, monkeypatch, env):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = qlora_main("train", str(write_recipe()))
    assert result.returncode == 2 and "no RANK or WORLD_SIZE" in result.stderr and "--multi_gpu" in result.stderr
    assert "Traceback" not in result.stderr
