"""Several processes, one run: what the launcher gave us, and what transformers needs for it.

    torchrun --nproc_per_node 2 -m qlora_cli train RECIPE       # or: accelerate launch -m qlora_cli train RECIPE
    qlora train RECIPE --nproc 2                                # the same, through accelerate launch

The launcher sets WORLD_SIZE, RANK and LOCAL_RANK; transformers' Trainer and accelerate do the rest
(process group, DistributedSampler, DDP/FSDP/DeepSpeed wrapping, gradient all-reduce). This
module only makes the choices they leave to the caller, each a known way for QLoRA runs to fail:

- Each rank loads the 4-bit model onto its own GPU (`device_map={"": LOCAL_RANK}`, modeling.py);
  a 4-bit model cannot be moved afterwards ("can't train a model loaded in 8-bit on a different
  device"). Under FSDP/DeepSpeed there is no device_map: the model is loaded on the CPU and the
  engine shards it.
- On the CPU, the Trainer only wraps the model in DDP when `use_cpu=True` (gloo). Without it each
  rank silently trains its own replica. build_sft_config sets it, and after training every rank's
  adapter fingerprint is compared (`replica_fingerprints`), so that silent failure cannot pass.
- FSDP-QLoRA needs the 4-bit container in the model's float dtype (config.py resolves it), FSDP1
  with use_orig_params=False, and loading on rank 0 only (cpu_ram_efficient_loading), as in
  PEFT's and bitsandbytes' FSDP-QLoRA guides.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

from qlora_cli.errors import StoppedRun, UserError

# Set by `qlora train --nproc` for the processes it launches: the file it writes to ask them to stop.


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a distributed launch."""
    return rank() == 0


def launcher_strategy() -> str | None:
    """The strategy an `accelerate launch --config_file` asked for, from the environment it sets."""
    truthy = ("1", "true", "yes")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        return "deepspeed"
    return None


def sharded_model(model) -> bool:
    """True once FSDP or DeepSpeed ZeRO-3 has split the model's parameters across processes."""
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()) or any(
        hasattr(p, "ds_id") for p in model.parameters()
    )


def check_launch(recipe) -> None:
    """Problems with the strategy that only the launch environment shows. Run before loading anything."""
    import torch

    d, cuda = recipe.distributed, torch.cuda.is_available()
    check_group_env()
    asked = launcher_strategy()
    if asked is not None and asked != d.strategy:
        raise UserError.single(
            "distributed.strategy", f"is {d.strategy}, but the accelerate config this was launched with uses "
            f"{asked}: set distributed.strategy: {asked} (the recipe decides how the 4-bit model is stored and "
            "loaded), or launch with a config for " + d.strategy,
        )
    if d.strategy == "deepspeed":
        deepspeed_stage(recipe)  # the file, and what its stage needs of the recipe
    if d.strategy != "ddp" and not cuda:
        raise UserError.single(
            "distributed.strategy", f"{d.strategy} shards the model across CUDA GPUs and there is none here: "
            "use ddp (the default), which also runs on the CPU",
        )
    if cuda and world_size() > 1 and os.environ.get("LOCAL_WORLD_SIZE"):
        local, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
        if local > gpus:
            raise UserError.single(
                "--nproc", f"{local} processes on this machine but {gpus} GPU(s): launch at most {gpus} per machine "
                "(each process holds its own GPU; a 4-bit model cannot share or change devices)",
            )
    if d.strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError.single("distributed.strategy", "deepspeed is not installed: pip install deepspeed")


# What MPI launchers set instead of RANK/WORLD_SIZE (accelerate reads them too).
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


def check_group_env() -> None:
    """A launch that meant several processes but set up no process group: each would train alone.

    `accelerate launch --cpu` across machines (`num_machines` > 1) sets MASTER_ADDR but, unless it
    runs under mpirun, no RANK or WORLD_SIZE: every machine's process then runs a whole
    single-process training of its own, and on a shared disk they write the same run directory.
    """
    if "MASTER_ADDR" not in os.environ or "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return
    if any(var in os.environ for var in MPI_RANK_VARS):
        return
    raise UserError.single(
        "launch",
        f"MASTER_ADDR is set ({os.environ['MASTER_ADDR']}), so this was launched to join other processes, but "
        "no RANK or WORLD_SIZE was set, so it would train alone, and so would every other machine. accelerate's "
        "--cpu launcher does this across machines unless it runs under mpirun: launch with --multi_gpu instead "
        "(torchrun underneath; it runs CPU processes too), or with torchrun --nnodes N --node_rank R",
    )


def deepspeed_stage(recipe) -> int:
    """The ZeRO stage of distributed.deepspeed_config, checking the file on the way."""
    path = Path(recipe.distributed.deepspeed_config).expanduser()
    stage = zero_optimization(recipe)["stage"]
    if stage == 3 and recipe.quant.storage_dtype == "uint8":
        raise UserError.single(
            "quant.storage_dtype", f"is uint8, but ZeRO-3 ({path.name}) partitions only float tensors: set it to "
            f"{recipe.model.dtype} like model.dtype, or remove it (auto)",
        )
    return stage


def zero_optimization(recipe) -> dict:
    """The `zero_optimization` section of distributed.deepspeed_config, checked, with its stage filled in.

    DeepSpeed reads it only once the processes have started, so a wrong value would end there in a
    traceback; here it is a message naming the file.
    """
    where = "distributed.deepspeed_config"
    path = Path(recipe.distributed.deepspeed_config).expanduser()
    zero = read_deepspeed_config(recipe).get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise UserError.single(where, f"zero_optimization in {path} must be a JSON object: see configs/deepspeed/zero3.json")
    stage = zero.get("stage", 0)
    if type(stage) is not int or stage not in (0, 1, 2, 3):
        raise UserError.single(where, f"zero_optimization.stage in {path} is {stage!r}: use 0, 1, 2 or 3")
    for key in ("offload_param", "offload_optimizer"):
        if not isinstance(zero.get(key) or {}, dict):
            raise UserError.single(
                where, f'zero_optimization.{key} in {path} must be a JSON object, e.g. {{"device": "cpu"}}'
            )
    return {**zero, "stage": stage}


def read_deepspeed_config(recipe) -> dict:
    """distributed.deepspeed_config as a dict; a missing or malformed file is a UserError naming it."""
    where = "distributed.deepspeed_config"
    path = Path(recipe.distributed.deepspeed_config).expanduser()
    if not path.is_file():
        raise UserError.single(where, f"file not found: {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError.single(where, f"{path} is not valid JSON ({exc}): see configs/deepspeed/zero3.json") from None
    if not isinstance(config, dict):
        raise UserError.single(where, f"{path} must hold a JSON object: see configs/deepspeed/zero3.json")
    return config


def init_process_group(cuda: bool):
    """Join the launcher's process group now, before the data is prepared (accelerate's shared state,
    so the Trainer later finds it ready). Returns None in a single process."""
    if world_size() == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not cuda)


@contextmanager
def leaving_together():
    """Leave the launcher's process group explicitly, and together, however `train` ends.

    A process that exits still in the group can die in interpreter teardown: gloo's worker
    threads still hold tensors whose release needs the GIL, and the process aborts (SIGABRT,
    pytorch/pytorch#179291). The launcher then kills the other ranks and the run exits 1 after
    all its work was saved. So on a normal end, and on a graceful stop (which every rank reaches
    at the same step), the ranks first wait for each other, then each destroys its group. On an
    error only one rank may have seen, nobody waits (the others might never arrive).
    """
    together = True
    try:
        yield
    except StoppedRun as exc:
        together = exc.graceful
        raise
    except BaseException:
        together = False
        raise
    finally:
        _leave(together)


def _leave(together: bool) -> None:
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_available() or not dist.is_initialized():
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def shared_run_dir(path: Path) -> bool:
    """Whether every process sees a file rank 0 has just written into the run directory: the machines
    share its filesystem (NFS, Lustre), or each has a disk of its own. The same answer on every rank.
    (A unique file name, so a leftover run directory on another machine's own disk cannot fool it.)"""
    import secrets

    import torch
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return True
    device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    nonce = torch.tensor([secrets.randbits(62) if rank() == 0 else 0], dtype=torch.int64, device=device)
    dist.broadcast(nonce, src=0)
    probe = Path(path) / f".qlora-shared-{int(nonce.item()):x}"
    if rank() == 0:
        probe.write_text("", encoding="utf-8")
    dist.barrier()
    seen = torch.tensor([1 if probe.is_file() else 0], device=device)
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # everyone has looked once this returns
    if rank() == 0:
        probe.unlink(missing_ok=True)
    return bool(seen.item())


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def main_process_first(state):
    """Rank 0 prepares (and caches) the data first; the others then read its cache."""
    with state.main_process_first() if state is not None else nullcontext():
        yield


def prepare_loading(recipe) -> None:
    """Under FSDP, transformers loads the 4-bit weights on rank 0 and leaves the other ranks' copies
    empty for FSDP to fill (sync_module_states); it reads that choice from the environment, which
    `accelerate launch` sets but torchrun does not."""
    if recipe.distributed.strategy == "fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def trainer_arguments(recipe) -> dict:
    """SFTConfig keyword arguments for the strategy (pure: a function of the recipe and WORLD_SIZE)."""
    d = recipe.distributed
    if d.strategy == "fsdp":
        return {
            "fsdp": True,
            "fsdp_config": {
                "reshard_after_forward": "full_shard",  # FSDP1's name for the sharding strategy
                # FSDP1, the path FSDP-QLoRA was built and documented on (PEFT, bitsandbytes), still in
                # the pinned transformers. FSDP2's fully_shard turns each Params4bit into a plain
                # tensor and drops its quantization state (axolotl#2992); accelerate only works
                # around that by not sharding uint8 weights at all (accelerate#3983).
                "version": 1,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # PEFT's policy is applied on top by the Trainer
                "use_orig_params": False,  # what makes frozen 4-bit and trainable LoRA weights shard apart
                "cpu_ram_efficient_loading": True,  # rank 0 loads, the others receive
                "sync_module_states": True,
                "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints; the final adapter is gathered whole
                "cpu_offload": d.fsdp_cpu_offload,
            },
            # Reentrant checkpointing, as PEFT's FSDP-QLoRA example runs it.
            "gradient_checkpointing_kwargs": {"use_reentrant": True} if recipe.train.gradient_checkpointing else None,
        }
    if d.strategy == "deepspeed":
        return {"deepspeed": str(Path(d.deepspeed_config).expanduser())}
    if world_size() > 1:
        # Every LoRA weight gets a gradient each step; searching the graph for unused ones costs a
        # traversal per step (and breaks reentrant checkpointing).
        return {"ddp_find_unused_parameters": False}
    return {}


def global_batch(recipe) -> int:
    t = recipe.train
    return t.batch_size * t.gradient_accumulation_steps * world_size()


def checkpoint_world_size(checkpoint: Path) -> int | None:
    """How many processes wrote a checkpoint: transformers saves one RNG state per process
    (rng_state_<rank>.pth), or a single rng_state.pth without a launcher. None if it has neither."""
    ranks = len(list(checkpoint.glob("rng_state_*.pth")))
    return ranks or (1 if (checkpoint / "rng_state.pth").is_file() else None)


def resume_world_size_warning(checkpoint: Path, recipe) -> str | None:
    """A resume with another number of processes works but does not continue exactly: say why."""
    before, now = checkpoint_world_size(checkpoint), world_size()
    if before is None or before == now:
        return None
    per_process = recipe.train.batch_size * recipe.train.gradient_accumulation_steps
    again = f"`--nproc {before}` (or the same launcher)" if before > 1 else "one process (no --nproc, no launcher)"
    return (f"{checkpoint.name} was written by {before} process(es) and this run has {now}: the global batch changes "
            f"from {per_process * before} to {per_process * now} rows per step, and the batches skipped to reach "
            f"that step are not the ones trained before, so some rows of this epoch will be trained twice and "
            f"others not at all. To continue exactly, resume with {again}")


def fingerprint(model) -> str:
    """A hash of this process's trainable weights: equal on every rank after a correct DDP run."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def gather_fingerprints(model) -> list[str]:
    """Every rank's fingerprint, in rank order (all ranks must call this)."""
    import torch.distributed as dist

    mine = fingerprint(model)
    if world_size() == 1 or not dist.is_initialized():
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def launch(nproc: int, train_args: list[str]) -> int:
    """`qlora train ... --nproc N`: run `qlora train` in N processes through `accelerate launch`
    (torchrun underneath) on this machine, and return the exit code of the launch.

    One process per GPU when there are GPUs; N CPU processes (DDP over gloo) when there are none.
    Multi-machine runs take an accelerate config instead: see configs/accelerate/.
    """
    import socket
    import subprocess
    import sys

    import torch

    from qlora_cli.train.stopping import relayed_stops

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError.single(
            "--nproc", f"is {nproc}, but this machine has {torch.cuda.device_count()} GPU(s): one process per GPU "
            "(a 4-bit model cannot share or change devices)",
        )
    with socket.socket() as sock:  # a free rendezvous port, so two runs on one machine do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", str(port),
        # The recipe decides precision and compilation; the launcher's own defaults would only warn.
        "--mixed_precision", "no", "--dynamo_backend", "no",
        # accelerate's --cpu mode starts a single process; its multi-GPU launcher (torchrun) runs
        # CPU processes too, and the Trainer then uses gloo (use_cpu).
        "--multi_gpu",
        "-m", "qlora_cli", "train", *train_args,
    ]
    # Ctrl-C and SIGTERM reach the workers through a stop file, not the terminal: stopping.py.
    start = lambda env: subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True)  # noqa: E731
    with relayed_stops(start) as (process, asked):
        code = process.wait()
    return 128 + asked[0] if asked else code
