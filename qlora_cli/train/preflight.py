"""Checks on a run's inputs that need no model, no data and no heavy library.

    recipe = with_output_dir(recipe, "--output-dir value or None")
    check_inputs(recipe, RunDir(recipe.output.dir), overwrite, resume, warn)  # paths only: instant
    preflight(recipe, RunDir(recipe.output.dir), overwrite, resume, warn)     # those + this machine

This module imports neither torch nor transformers at the top. `qlora train` runs check_inputs
before it loads them (several seconds on a laptop), so a wrong path, a run directory that is in
the way or a recipe that does not match the run being resumed is reported at once, not after the
libraries load. preflight adds what the machine must have (bitsandbytes, a GPU for some settings,
trackers); train.py runs it before it loads the model or writes anything.
"""

from __future__ import annotations

from pathlib import Path

from qlora_cli.data.sources import check_data_files
from qlora_cli.errors import NothingToDo, UserError
from qlora_cli.model.location import check_model_path
from qlora_cli.outputs.run_dir import RunDir
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train import distributed


def with_output_dir(recipe: Recipe, output_dir: str | None) -> Recipe:
    if output_dir is None:
        return recipe
    return recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": output_dir})})


def check_inputs(recipe: Recipe, run: RunDir, overwrite: bool, resume: str | None, warn,
                 hashes: bool = True, recipe_file: str | Path | None = None) -> Path | None:
    """The run directory (free, or resumable with this recipe), the model path and the data files.

    Read-only; returns the checkpoint to resume from, if any. hashes=False does not read the
    checkpoint's files to verify them (the quick look `qlora train` takes before loading libraries).
    recipe_file, the YAML the recipe was read from, is protected from --overwrite like the inputs.
    """
    checkpoint = None
    if resume is not None:
        if holder := run.lock_holder():
            raise UserError.single("--resume", f"{run.path} is being written by another qlora process ({holder}): "
                                   "wait for it to finish before continuing the run")
        checkpoint = resume_point(run, recipe, resume, warn, hashes)
    else:
        sources = [*recipe.data.sources, *recipe.data.val_sources]
        inputs = [Path(recipe.model.name_or_path), *([Path(recipe_file)] if recipe_file else [])]
        inputs += [Path(src.path) for src in sources]
        run.check_available(overwrite, protected=tuple(p for p in inputs if p.exists()))
    check_model_path(recipe.model)
    check_data_files(recipe.data)
    return checkpoint


def preflight(recipe: Recipe, run: RunDir, overwrite: bool, resume: str | None, warn) -> Path | None:
    """Every check that needs no model or data loaded; returns the checkpoint to resume from, if any.

    Read-only, so each rank of a launch runs it and stops alike (rank 0 alone reports, cli.main),
    and `qlora train --nproc` runs it before launching anything.
    """
    checkpoint = check_inputs(recipe, run, overwrite, resume, warn)
    check_bitsandbytes()
    check_attention(recipe.model)
    check_trackers(recipe.train)
    check_compute_dtype(recipe.quant)
    for note in (precision_note(recipe), optimizer_note(recipe)):
        if note:
            warn(note)
    distributed.check_launch(recipe)
    check_speed_options(recipe.train)
    if remote_code_warning(recipe.model):
        warn(remote_code_warning(recipe.model))
    return checkpoint


# Recipe sections a resumed run must share with the checkpoint: they decide the model, the adapter's
# shape and the data order. train.* may change (more steps, another save interval) with a warning.
FIXED_ON_RESUME = ("model", "quant", "lora", "data")
FREE_ON_RESUME = {"data.cache", "data.num_proc"}  # how the rows are prepared, not which rows


def resume_point(run: RunDir, recipe: Recipe, resume: str, warn, hashes: bool = True) -> Path:
    """Check that RUN can be resumed with this recipe, and return the checkpoint to resume from."""
    from qlora_cli.outputs.run_dir import RECIPE
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.train.checkpoints import STATE, find_resume_point

    if not (run / RECIPE).is_file():
        raise UserError.single(
            "--resume", f"{run.path} is not a run directory (no {RECIPE}): there is nothing to resume; "
            "train without --resume, or point --output-dir at the run to continue",
        )
    saved = load_recipe(run / RECIPE).model_dump()
    new = recipe.with_absolute_paths().model_dump()
    fixed = [k for k in _changed_keys(saved, new) if k.split(".")[0] in FIXED_ON_RESUME and k not in FREE_ON_RESUME]
    if fixed:
        raise UserError.single(
            "--resume", f"the recipe differs from the run's {RECIPE} in {', '.join(fixed)}: a checkpoint only "
            "continues the same model, adapter and data; restore those keys, or train a new run",
        )
    for key in _changed_keys(saved["train"], new["train"], "train"):
        warn(f"{key} changed since the run started; the continuation will differ from the original plan")
    explicit = None
    if resume != "latest":
        explicit = Path(resume).expanduser()
        if not (explicit / STATE).is_file() and not explicit.name.startswith("checkpoint-"):
            raise UserError.single("--resume", f"{resume} is not a checkpoint directory (checkpoint-N with {STATE})")
        if explicit.resolve().parent != run.checkpoints.resolve():
            raise UserError.single(
                "--resume", f"{resume} is not a checkpoint of {run.path}: resume a run in its own directory "
                "(--output-dir RUN)",
            )
    checkpoint = find_resume_point(run.checkpoints, explicit, warn, hashes)
    _check_steps_left(run, recipe, saved, checkpoint)
    if message := distributed.resume_world_size_warning(checkpoint, recipe):
        warn(message)
    return checkpoint


def _check_steps_left(run: RunDir, recipe: Recipe, saved: dict, checkpoint: Path) -> None:
    """Refuse to resume past the end: a checkpoint at or beyond the run's last step has nothing to
    train (the trainer would otherwise run one step more than asked, and write it as a new step)."""
    import json

    from qlora_cli.outputs.run_dir import SUMMARY
    from qlora_cli.train.checkpoints import STATE, step_of

    step = step_of(checkpoint)
    last = recipe.train.max_steps or None
    if last is None and saved["train"].get("epochs") == recipe.train.epochs:  # epochs unchanged: the step count is
        last = json.loads((checkpoint / STATE).read_text(encoding="utf-8")).get("max_steps") or None  # as planned
    if last is None or step < last:
        return
    more = f"--set train.max_steps={max(2 * step, step + 1)}"
    if step > last:
        raise UserError.single("train.max_steps", f"is {last}, but {checkpoint.name} is already at step {step}: "
                               f"there is nothing to train; to continue the run, resume with a larger value "
                               f"({more})")
    done = "is already complete" if (run / SUMMARY).is_file() else "reached its last step"
    raise NothingToDo(f"{run.path} {done} at step {step} of {last}: nothing to train. To train it further, "
                      f"resume with a larger train.max_steps ({more}).")


def _changed_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(a.keys() | b.keys()):
            out += _changed_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix]


def check_bitsandbytes() -> None:
    """4-bit QLoRA needs bitsandbytes >= 0.50 (the first release with CPU NF4 kernels), and a device it supports."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError.single("bitsandbytes", "is not installed: pip install 'bitsandbytes>=0.50'")
    from packaging.version import Version

    version = importlib.metadata.version("bitsandbytes")
    if Version(version) < Version("0.50"):
        raise UserError.single("bitsandbytes", f"{version} is too old (4-bit on this device needs >= 0.50): "
                               "pip install -U 'bitsandbytes>=0.50'")


def check_attention(model) -> None:
    """flash_attention_2 needs a CUDA GPU and the flash-attn package: say so before the data is prepared.

    (eager and sdpa need neither, and both keep packed examples apart through the per-example
    position ids: tests/test_packing.py checks each.)
    """
    if model.attn_implementation != "flash_attention_2":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError.single("model.attn_implementation", "flash_attention_2 needs a CUDA GPU: use sdpa here")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError.single(
            "model.attn_implementation", "flash_attention_2 needs the flash-attn package: pip install flash-attn, or use sdpa"
        )


def check_trackers(train_section) -> None:
    """Each experiment tracker in train.report_to must be installed (transformers fails late otherwise)."""
    from importlib.util import find_spec

    modules = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
    missing = [name for name in train_section.report_to if find_spec(modules[name]) is None]
    if missing:
        raise UserError.single(
            "train.report_to", f"{', '.join(missing)} is not installed: pip install {' '.join(missing)}, or remove it"
        )


def check_speed_options(train_section) -> None:
    """Liger's kernels are Triton kernels: they need CUDA and the package (an optional extra)."""
    if not train_section.liger_kernel:
        return
    from importlib.util import find_spec

    import torch

    if not torch.cuda.is_available():
        raise UserError.single("train.liger_kernel", "Liger's kernels run on CUDA GPUs only and there is none here: "
                               "set it to false")
    if find_spec("liger_kernel") is None:
        raise UserError.single("train.liger_kernel", "liger-kernel is not installed: pip install 'qlora-cli[liger]' "
                               "(or liger-kernel), or set it to false")


def check_compute_dtype(quant) -> None:
    """bf16 compute needs a GPU that has it (Ampere or newer); say so before loading 7B weights."""
    if quant.compute_dtype != "bfloat16":
        return
    import torch

    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError.single(
            "quant.compute_dtype", f"{torch.cuda.get_device_name()} has no bfloat16 support: use float16"
        )


def precision_note(recipe: Recipe) -> str | None:
    """What the run really computes in, when model.dtype (the checkpoint's unquantized layers) and
    quant.compute_dtype differ; None when they agree.

    bitsandbytes (0.50) runs a 4-bit layer's matmul in quant.compute_dtype, dequantizing the 4-bit
    weights at that precision, but hands its result back in the dtype of its input, which is the
    dtype of the layers around it. With float32 compute, training upcasts those (embeddings, norms,
    head) to fp32 (peft's prepare_model_for_kbit_training; under 16-bit autocast only the norms stay
    upcast: model/load.py frozen_weights_stay_narrow); loading the run for generation, evaluation, the
    merge's check or a plain PeftModel keeps them in model.dtype. (tests/test_merge_floor.py checks
    both facts.)
    """
    model_dtype, compute = recipe.model.dtype, recipe.quant.compute_dtype
    if model_dtype == compute:
        return None
    if compute == "float32":
        text = f"model.dtype is {model_dtype} and quant.compute_dtype float32: the 4-bit matmuls run in float32, "
        if recipe.distributed.sharded:  # no upcast under sharding (modeling.attach_lora)
            text += (f"but the unquantized layers stay {model_dtype} under {recipe.distributed.strategy}, so "
                     f"activations pass between layers in {model_dtype}")
        else:
            text += (f"and training runs in float32 throughout (peft upcasts the unquantized layers), but loaded "
                     f"for generate, eval or merge the run passes {model_dtype} activations between its layers, "
                     f"so it computes partly in {model_dtype} there")
        import torch

        if not torch.cuda.is_available():
            text += ("; on the CPU, set model.dtype: float32 for float32 throughout (the 4-bit weights stay the "
                     "same; only the unquantized layers take twice the memory)")
        return text
    return (f"model.dtype is {model_dtype} and quant.compute_dtype {compute}: the 4-bit matmuls run in {compute}, "
            f"the unquantized layers hold {model_dtype} weights")


def optimizer_note(recipe: Recipe) -> str | None:
    """A paged optimizer without a GPU: bitsandbytes runs it unpaged (it says so in a warning at the
    first step, which the CLI silences in favour of this line before the run)."""
    if not recipe.train.optimizer.startswith("paged_"):
        return None
    import torch  # only for a paged optimizer: the question is whether there is a GPU

    if not torch.cuda.is_available():
        return (f"train.optimizer is {recipe.train.optimizer}: with no GPU, bitsandbytes runs it without paging "
                "(the same updates; paging only moves optimizer state out of GPU memory)")
    return None


def remote_code_warning(model) -> str | None:
    """The warning to show when the model repository's own Python code will run (the command line
    allowed it: remote_code.require_consent has refused it otherwise)."""
    if not model.trust_remote_code:
        return None
    from qlora_cli.model.remote_code import what_would_run

    return (f"--trust-remote-code: {what_would_run(model.name_or_path, model.revision)} will run on this machine "
            "with your permissions")
