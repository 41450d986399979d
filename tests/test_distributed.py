"""Multi-process training on the CPU (DDP over gloo), through the real launchers, and the
DDP/FSDP/DeepSpeed settings the recipe turns into (unit tests: FSDP and DeepSpeed need GPUs).

The end-to-end flow trains the tiny recipe for 2 epochs with `qlora train --nproc 2` (accelerate
launch), stops it with SIGINT part-way, resumes it with --nproc 2, and compares the result with
the same recipe trained in one process at twice the per-device batch: the same global batches,
so the same losses and adapter (measured: losses equal to 1e-6, adapters to 6e-6).
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
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, run_cli, tiny_recipe
from qlora_cli.errors import UserError

ROWS = 360  # training rows of the tiny recipe (400 minus 40 held out)
EPOCHS, PER_DEVICE, WORLD = 2, 9, 2  # 360 / (9 x 2) = 20 optimizer steps per epoch, exactly


def _recipe(tiny, tmp: Path, batch_size: int, out: str = "run") -> Path:
    raw = tiny_recipe(tiny, tmp / out)
    raw["train"].update(max_steps=None, epochs=EPOCHS, batch_size=batch_size, logging_steps=1, save_steps=1000)
    path = tmp / f"recipe_bs{batch_size}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _wait_for_step(metrics: Path, step: int, proc, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if metrics.is_file():
            steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} in {metrics} after {timeout} s")


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def ddp_runs(tiny, tmp_path_factory):
    """(2-process run dir, its two processes' outputs, 1-process run dir, the cwd of the 2-process runs)."""
    work = tmp_path_factory.mktemp("ddp")
    recipe = _recipe(tiny, work, PER_DEVICE)
    command = [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--nproc", str(WORLD), "--quiet"]
    env = {**os.environ, "COLUMNS": "200"}
    # Its own session, like a terminal's foreground job; SIGINT goes to `qlora` alone, as Ctrl-C would.
    first = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    _wait_for_step(work / "run" / "metrics.jsonl", 8, first)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=180)
    stopped = subprocess.CompletedProcess(command, first.returncode, out, err)
    resumed = subprocess.run([*command, "--resume"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    single = tmp_path_factory.mktemp("single")
    proc = run_cli("train", str(_recipe(tiny, single, PER_DEVICE * WORLD)), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run", (stopped, resumed), single / "run", work


@pytest.mark.slow  # ddp_runs: three launches, 40 steps each
def test_two_processes_train_one_model_into_one_run_directory(ddp_runs):
    run, (stopped, resumed), _, work = ddp_runs
    # Exactly one run directory, written once: the 2 ranks share it, nothing else appeared.
    assert sorted(p.name for p in work.iterdir()) == ["recipe_bs9.yaml", "run"]
    summary = json.loads((run / "summary.json").read_text())
    d = summary["distributed"]
    assert d["world_size"] == WORLD and d["strategy"] == "ddp"
    assert d["global_batch"] == PER_DEVICE * WORLD
    # Each rank hashed its own trainable weights after training: one model, not two replicas.
    assert len(d["replica_fingerprints"]) == WORLD and d["replicas_identical"] is True
    assert len(set(d["replica_fingerprints"])) == 1
    # The global batch arithmetic: 360 rows / (9 per device x 2 processes) x 2 epochs.
    assert summary["steps"] == EPOCHS * ROWS // (PER_DEVICE * WORLD) == 40
    assert summary["epochs"] == pytest.approx(EPOCHS)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # each step logged once, across the stop
    panel = " ".join(resumed.stderr.replace("│", " ").split())  # the end panel, its line wrapping undone
    assert "processes 2 (ddp); global batch 18 rows per optimizer step, replicas identical" in panel


@pytest.mark.slow  # ddp_runs
def test_sigint_stops_every_rank_at_one_checkpoint_and_resume_continues(ddp_runs):
    from qlora_cli.train.checkpoints import problem

    run, (stopped, resumed), _, _ = ddp_runs
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert stopped.stderr.count("stopped: SIGINT after step") == 1, stopped.stderr[-3000:]  # rank 0 speaks
    assert "Traceback" not in stopped.stderr and "SIGINT again" not in stopped.stderr, stopped.stderr[-3000:]
    step = int(stopped.stderr.split("stopped: SIGINT after step ")[1].split(".")[0])
    assert 8 <= step < 40
    summary = json.loads((run / "summary.json").read_text())
    checkpoint = Path(summary["resumed_from"])
    assert checkpoint.name == f"checkpoint-{step}"
    # Both ranks' RNG states are in it, and the manifest vouches for every file.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    assert problem(checkpoint, hashes=True) is None


@pytest.mark.slow  # ddp_runs
@pytest.mark.parametrize("which, world, warned", [("2 processes", "1", "from 18 to 9 rows per step"),
                                                   ("2 processes", "2", None),
                                                   ("1 process", "2", "from 18 to 36 rows per step")])
def test_resuming_with_another_number_of_processes_is_warned_about(ddp_runs, monkeypatch, which, world, warned):
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.outputs.run_dir import RECIPE, RunDir
    from qlora_cli.train.preflight import preflight

    run = ddp_runs[0] if which == "2 processes" else ddp_runs[2]
    monkeypatch.setenv("WORLD_SIZE", world)
    warnings = []
    # The runs are complete at step 40: resuming them asks for more steps, as a user would.
    recipe = load_recipe(run / RECIPE, ["train.max_steps=80"])
    checkpoint = preflight(recipe, RunDir(run), False, "latest", warnings.append)
    assert checkpoint.name == "checkpoint-40"
    # The first warning is about the longer plan asked for above; what follows it is this test's subject.
    assert "train.max_steps changed" in warnings.pop(0)
    if warned is None:
        assert warnings == []
    else:
        before = 2 if which == "2 processes" else 1
        [message] = warnings
        assert f"written by {before} process(es) and this run has {world}" in message and warned in message
        assert ("--nproc 2" if before == 2 else "one process") in message


@pytest.mark.slow  # ddp_runs
def test_two_processes_match_one_process_at_twice_the_batch(ddp_runs):
    run, _, single, _ = ddp_runs
    # accelerate splits each global batch between the ranks, and the loss is averaged over all
    # tokens of the global batch, so both runs see the same 18-row batches in the same order.
    two, one = _losses(run), _losses(single)
    assert two.keys() == one.keys() and len(one) == 40
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert two[40] < 0.5 * two[1]  # and it learned
    a, b = load_file(run / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)
    # The Trainer's own distributed evaluation pads the 40 rows to equal shards and averages per
    # batch, so its eval_loss differs slightly (measured 1.5%); `qlora eval` scores both exactly.
    s2, s1 = (json.loads((r / "summary.json").read_text())["eval_loss"] for r in (run, single))
    assert s2 == pytest.approx(s1, rel=0.03)


@pytest.mark.slow  # a torchrun launch, interrupted
def test_torchrun_ctrl_c_saves_one_checkpoint_on_every_rank(tiny, tmp_path):
    """Under plain torchrun, Ctrl-C reaches each worker twice (terminal, then torchrun forwarding
    it): that must count as one press, and the ranks must agree on the step to stop at."""
    from qlora_cli.train.checkpoints import problem

    recipe = _recipe(tiny, tmp_path, 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "qlora_cli", "train", str(recipe), "--quiet"],
        cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    _wait_for_step(tmp_path / "run" / "metrics.jsonl", 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    _, err = proc.communicate(timeout=180)
    assert err.count("stopped: SIGINT after step") == 1, err[-3000:]
    assert "SIGINT again" not in err, err[-3000:]  # one press, not two
    step = int(err.split("stopped: SIGINT after step ")[1].split(".")[0])
    checkpoint = tmp_path / "run" / "checkpoints" / f"checkpoint-{step}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    assert problem(checkpoint, hashes=True) is None


# --- What each strategy turns into (no launch) ------------------------------------------------


def _load(tiny, tmp_path, *overrides):
    from qlora_cli.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny, tmp_path / "run")))
    return load_recipe(path, list(overrides))


def test_ddp_settings_follow_the_world_size(tiny, tmp_path, monkeypatch):
    from qlora_cli.train import distributed
    from qlora_cli.model.load import build_bnb_config

    recipe = _load(tiny, tmp_path, "train.batch_size=4", "train.gradient_accumulation_steps=3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.trainer_arguments(recipe) == {}  # one process: no DDP settings at all
    assert distributed.global_batch(recipe) == 12
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.trainer_arguments(recipe) == {"ddp_find_unused_parameters": False}
    assert distributed.global_batch(recipe) == 4 * 3 * 4
    assert build_bnb_config(recipe.quant).bnb_4bit_quant_storage == torch.uint8


def test_fsdp_becomes_fsdp_qlora_arguments_and_float_storage(tiny, tmp_path):
    from qlora_cli.model.load import build_bnb_config
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.train.run import build_sft_config

    recipe = _load(tiny, tmp_path, "distributed.strategy=fsdp", "train.optimizer=adamw_torch",
                   "train.gradient_checkpointing=true", "distributed.fsdp_cpu_offload=true")
    # One uniform float dtype: the 4-bit container takes model.dtype (float32 in the tiny recipe).
    assert recipe.quant.storage_dtype == "float32"
    bnb = build_bnb_config(recipe.quant)
    assert bnb.bnb_4bit_quant_storage == torch.float32 and bnb.bnb_4bit_quant_type == "nf4"
    args = build_sft_config(recipe, RunDir(tmp_path / "run"), has_eval=True, template=None)
    plugin = args.fsdp_plugin_args  # what the Trainer hands accelerate's FullyShardedDataParallelPlugin
    assert args.fsdp is True
    assert plugin["fsdp_version"] == 1 and plugin["use_orig_params"] is False
    assert plugin["cpu_ram_efficient_loading"] is True and plugin["sync_module_states"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and plugin["reshard_after_forward"] == "full_shard"
    assert plugin["cpu_offload"] is True
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING") == "true"  # set by the TrainingArguments


def test_deepspeed_takes_the_zero3_config_and_float_storage(tiny, tmp_path):
    from qlora_cli.train import distributed
    from qlora_cli.model.load import build_bnb_config

    zero3 = ROOT / "configs" / "deepspeed" / "zero3.json"
    recipe = _load(tiny, tmp_path, "distributed.strategy=deepspeed", f"distributed.deepspeed_config={zero3}")
    assert distributed.trainer_arguments(recipe) == {"deepspeed": str(zero3)}
    assert distributed.deepspeed_stage(recipe) == 3
    assert build_bnb_config(recipe.quant).bnb_4bit_quant_storage == torch.float32
    config = json.loads(zero3.read_text())
    # The adapter is gathered whole when saved; the recipe fills every "auto".
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    broken = tmp_path / "broken.json"
    broken.write_text("{ stage: 3 ")
    recipe = _load(tiny, tmp_path, "distributed.strategy=deepspeed", f"distributed.deepspeed_config={broken}")
    with pytest.raises(UserError, match="distributed.deepspeed_config: .*broken.json is not valid JSON"):
        distributed.deepspeed_stage(recipe)
    # Values DeepSpeed would only trip over after launch are refused up front, naming the key.
    for zero, key in [({"stage": "three"}, "zero_optimization.stage"), ({"stage": 4}, "zero_optimization.stage"),
                      ({"stage": True}, "zero_optimization.stage"), ([3], "zero_optimization in"),
                      ({"stage": 2, "offload_optimizer": "cpu"}, "zero_optimization.offload_optimizer")]:
        broken.write_text(json.dumps({"zero_optimization": zero}))
        with pytest.raises(UserError, match=f"distributed.deepspeed_config: {key}"):
            distributed.deepspeed_stage(recipe)


def test_a_launcher_config_that_contradicts_the_recipe_is_refused(tiny, tmp_path, monkeypatch):
    from qlora_cli.train import distributed
    recipe = _load(tiny, tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    with pytest.raises(UserError, match="distributed.strategy: is ddp, but the accelerate config .* uses fsdp"):
        distributed.check_launch(recipe)


def test_shipped_launch_configs_are_what_the_readme_says(tiny):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from qlora_cli.recipe.load import load_recipe

    configs = ROOT / "configs" / "accelerate"
    ddp = load_config_from_file(str(configs / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_machines == 1
    fsdp = load_config_from_file(str(configs / "fsdp_qlora.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is False and fsdp.fsdp_config["fsdp_cpu_ram_efficient_loading"]
    multi = load_config_from_file(str(configs / "multi_node.yaml"))
    assert multi.num_machines == 2 and multi.main_process_ip
    example = load_recipe(ROOT / "configs" / "llama70b_fsdp_qlora.yaml")
    assert example.distributed.strategy == "fsdp" and example.quant.storage_dtype == example.model.dtype


def test_nproc_checks_the_recipe_before_launching_anything(write_recipe, tmp_path, qlora_main, monkeypatch):
    from qlora_cli.train import distributed
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched despite a bad recipe"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    result = qlora_main("train", write_recipe(), "--nproc", "2")
    assert result.returncode == 2
    assert "output.dir" in result.stderr and "already exists and is not empty" in result.stderr
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"
    result = qlora_main("train", write_recipe(), "--nproc", "0")
    assert result.returncode == 2 and "--nproc" in result.stderr


@pytest.mark.parametrize("ending, waits", [("returns", True), ("graceful stop", True), ("second signal", False),
                                           ("error", False)])
def test_every_rank_leaves_the_process_group_and_waits_only_when_all_will_arrive(monkeypatch, tmp_path, ending, waits):
    """A rank that exits still in a gloo group can abort in interpreter teardown (pytorch#179291),
    and the launcher then fails the whole run; a rank that waited after an error only it saw would
    hang. A one-member gloo group stands in for the launcher's."""
    import torch.distributed as dist

    from qlora_cli.train import distributed
    from qlora_cli.errors import StoppedRun

    monkeypatch.setenv("WORLD_SIZE", "2")  # what a launcher sets; the group below has one member
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    barriers = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (barriers.append(1), real_barrier(*a, **k)))
    raised = {"returns": None, "graceful stop": StoppedRun(130, "stopped", graceful=True),
              "second signal": StoppedRun(130, "stopped at once"), "error": OSError("disk full")}[ending]
    try:
        with distributed.leaving_together():
            if raised is not None:
                raise raised
    except (StoppedRun, OSError) as exc:
        assert exc is raised  # passed on unchanged
    else:
        assert raised is None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
            pytest.fail("the process group was left initialized")
    assert barriers == ([1] if waits else [])
