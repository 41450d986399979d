"""`qlora train`: the whole run, readable top to bottom.

    recipe = load_recipe("configs/tiny.yaml")
    result = train(recipe)              # writes the run directory; returns the trainer too
    result.run_dir, result.summary

Order matters for safety: everything that can fail because of user input (paths, tokenizer,
template, data rows, model loading) happens before the run directory is created, so a bad
recipe never leaves a half-made directory behind.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_cli.data.pipeline import build_datasets
from qlora_cli.errors import EXIT_USER_ERROR, StoppedRun
from qlora_cli.model.architectures import check_vocab_fits
from qlora_cli.model.adapter import attach_adapter, keep_exact_adapter
from qlora_cli.model.load import (
    is_out_of_memory,
    keep_adapter_fp32,
    load_base_model,
)
from qlora_cli.model.tokenizer import prepare_tokenizer
from qlora_cli.outputs.run_dir import LOSS_PLOT, RunDir
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train import distributed
from qlora_cli.train.preflight import preflight, with_output_dir
from qlora_cli.train.progress import peak_memory
from qlora_cli.util.libraries import library_versions
from qlora_cli.util.memory import keep_freed_heap


@dataclass
class TrainResult:
    run_dir: RunDir
    summary: dict
    trainer: object  # the SFTTrainer, for callers (tests, notebooks) that want the live model


def build_sft_config(recipe: Recipe, run: RunDir, has_eval: bool, template, resuming: bool = False):
    """Recipe -> TRL's SFTConfig. Pure apart from asking whether a GPU is present."""
    from trl import SFTConfig

    args = trainer_arguments(recipe, run, has_eval, resuming)
    args.update(
        max_length=recipe.data.max_seq_len,
        # Best-fit-decreasing packing; TRL then runs padding-free, with position ids restarting at
        # each example, which the attention mask is built from, so packed examples stay separate.
        packing=recipe.data.packing,
        # on_too_long: split keeps long documents whole in the dataset; bfd_split cuts them into
        # max_seq_len blocks and packs those (plain bfd would truncate them).
        packing_strategy="bfd_split" if recipe.data.on_too_long == "split" else "bfd",
        eos_token=template.stop if template and template.stop else None,
    )
    return SFTConfig(**args)


def trainer_arguments(recipe: Recipe, run: RunDir, has_eval: bool, resuming: bool = False) -> dict:
    """The TrainingArguments every method shares (SFT here, DPO/ORPO/KTO in train/preference.py)."""
    t, cuda = recipe.train, torch.cuda.is_available()
    args = dict(
        output_dir=str(run.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        # transformers 5 takes a ratio below 1 or a step count in the same field.
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=t.optimizer,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,  # so the summary's first loss is the loss before any update
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        # On resume the step-0 evaluation is already in metrics.jsonl.
        eval_on_start=has_eval and t.eval_on_start and not resuming,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointingTrainer rotates, only once the new checkpoint is whole
        logging_nan_inf_filter=False,  # a NaN loss must show in the log, not be averaged away
        report_to=list(t.report_to) or "none",
        # Mixed precision follows the 4-bit compute dtype. fp16 autocast needs a GPU.
        bf16=recipe.quant.compute_dtype == "bfloat16",
        fp16=recipe.quant.compute_dtype == "float16" and cuda,
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,  # RichProgress replaces tqdm
        dataloader_pin_memory=cuda,
        use_liger_kernel=t.liger_kernel,  # applied by the Trainer (layer kernels; TRL keeps its own fused LM head)
        torch_compile=t.torch_compile,
    )
    # DDP, FSDP or DeepSpeed settings (distributed.py). use_cpu above is also what makes the Trainer
    # wrap the model in DDP over gloo on the CPU; without it each rank would train alone.
    args.update(distributed.trainer_arguments(recipe))
    return args


@dataclass
class Setup:
    """Everything built before the run directory exists: nothing here has written to disk."""

    trainer: object  # SFTTrainer
    tokenizer: object
    template: object  # Template or None
    data: object  # PreparedData
    model: object
    parameters: tuple[int, int]  # (trainable, total), counted before FSDP/DeepSpeed shard the model
    process_group: object = None  # accelerate's PartialState under a launcher, else None
    save_adapter: object = None  # how the final adapter is written, when not model.save_pretrained (preference.py)


def build_trainer(recipe: Recipe, run: RunDir, console=None, resuming: bool = False, callbacks=(),
                  display: str = "rich", phase=lambda text: None) -> Setup:
    """Tokenizer, data, 4-bit model, LoRA and the SFTTrainer, from a validated recipe.

    display: "rich" (the live progress display on `console`), "json" (one JSON line per log on
    stdout) or "quiet" (nothing while training). phase(text) names each step as it starts (the
    CLI's spinner shows it).
    """
    from transformers import PrinterCallback, set_seed

    from qlora_cli.train.metrics_log import MetricsLog
    from qlora_cli.train.progress import JsonLines, RichProgress
    from qlora_cli.train.trainer import CheckpointingTrainer, fused_loss_for

    set_seed(recipe.train.seed)
    group = distributed.init_process_group(cuda=torch.cuda.is_available())
    phase("loading the tokenizer")
    tokenizer, template = prepare_tokenizer(recipe)
    phase("tokenizing the data")
    with distributed.main_process_first(group):  # rank 0 prepares and caches; the others read the cache
        prepared = build_datasets(
            recipe.data, tokenizer, template, seed=recipe.train.seed, batch_size=recipe.train.batch_size
        )
    train_ds, eval_ds = prepared.for_trainer()
    distributed.prepare_loading(recipe)
    phase(f"loading {recipe.model.name_or_path} in 4 bits")
    model = load_base_model(recipe.model, recipe.quant, place=not recipe.distributed.sharded)
    check_vocab_fits(tokenizer, model.get_input_embeddings().num_embeddings)
    # No KV cache in training: it is useless there, and with one, transformers ignores packed
    # position ids and lets packed examples attend to each other (tests/test_packing.py).
    model.config.use_cache = False
    model = attach_adapter(model, recipe, phase)  # fresh LoRA, or model.adapter's to continue (model/adapter.py)

    restore_adapter = keep_exact_adapter(model) if recipe.model.adapter else None
    # SFTTrainer owns the loop, checkpointing, mixed precision and distributed launch; the
    # subclass only makes checkpoints atomic and stops on a non-finite loss (trainer.py).
    trainer = CheckpointingTrainer(
        model=model,
        args=build_sft_config(recipe, run, has_eval=eval_ds is not None, template=template, resuming=resuming),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[MetricsLog(run), *{"rich": [RichProgress(console)], "json": [JsonLines()], "quiet": []}[display],
                   *callbacks],
        keep_checkpoints=recipe.train.save_total_limit,
        fused_loss=fused_loss_for(recipe.train.loss_path),
    )
    trainer.remove_callback(PrinterCallback)  # RichProgress prints the logs; this would print them again
    if restore_adapter is not None:  # a continued adapter keeps its trained weights exactly (model/adapter.py)
        restore_adapter(trainer.model)
    keep_adapter_fp32(trainer.model)  # after SFTTrainer, which casts adapters to bf16 for 4-bit models
    return Setup(trainer=trainer, tokenizer=tokenizer, template=template, data=prepared, model=model,
                 parameters=parameter_counts(model), process_group=group)


def _per_machine_checkpoints_unless_shared(run: RunDir, trainer, checkpoint, overwrite: bool, say) -> None:
    """Several machines: on a filesystem they share, global rank 0 alone writes, publishes and rotates
    checkpoints (each process adds its own RNG state to the staging copy first). When each machine
    has a disk of its own, follow transformers' `save_on_each_node`: each machine's local rank 0 keeps
    a whole copy there (its own processes' RNG states included), so every machine can resume."""
    if distributed.shared_run_dir(run.path):
        return
    trainer.args.save_on_each_node = True  # TrainingArguments.should_save: local rank 0 of each machine
    if distributed.local_rank() == 0 and not distributed.is_main_process():
        if checkpoint is None:
            run.create(overwrite)
        else:
            run.prepare_resume(step=int(checkpoint.name.rsplit("-", 1)[1]))
    if distributed.is_main_process():
        say(f"[yellow]note:[/] the machines do not share {run.path}: each keeps its own checkpoints there "
            "(save_on_each_node); the adapter and run files are written on this machine (rank 0). To resume, "
            "run the same command on every machine, each with its own copy")


def train(recipe: Recipe, output_dir: str | None = None, overwrite: bool = False, resume: str | None = None,
          resume_command: str = "qlora train RECIPE --resume", console=None, display: str = "rich",
          estimate_command: str = "qlora estimate RECIPE", phase=lambda text: None) -> TrainResult:
    """Run one QLoRA fine-tune as the recipe describes and write the run directory.

    `resume` ("latest" or a checkpoint path) continues the run in the run directory from a whole
    checkpoint; `resume_command` is what to tell the user if this run is interrupted. `phase(text)`
    is told each loading step as it starts, and phase(None) once training is about to start.
    """
    # One writer per run directory: the lock is taken before the checks, so a second `qlora train`
    # into the same directory is refused at once, and held until the last file is written.
    with RunDir(with_output_dir(recipe, output_dir).output.dir).lock():
        with distributed.leaving_together():  # under a launcher: every rank leaves the process group cleanly
            return _train(recipe, output_dir, overwrite, resume, resume_command, console, display, estimate_command,
                          phase)


def _train(recipe, output_dir, overwrite, resume, resume_command, console, display, estimate_command,
           phase) -> TrainResult:
    from qlora_cli.train.stopping import GracefulStop, signal_name
    from qlora_cli.train.trainer import Diverged, NonFiniteLoss

    from qlora_cli.model.adapter import check_adapter, with_adapter_template

    recipe = with_adapter_template(with_output_dir(recipe, output_dir))  # model.adapter's run's template
    run = RunDir(recipe.output.dir)
    say = (lambda text: console.print(text, highlight=False, soft_wrap=True)) if console is not None else print
    warn = lambda text: say(f"[yellow]warning:[/] {text}")  # noqa: E731

    # 1. Checks and loading that can fail on user input: before anything is written.
    checkpoint = preflight(recipe, run, overwrite, resume, warn)
    check_adapter(recipe)
    # 2. The trainer, built before the run directory, so a setting it rejects leaves nothing behind.
    stop = GracefulStop(say=say, where_to_continue=lambda: f"{_last_checkpoint_text(run)} To continue: {resume_command}")
    build = build_trainer
    if recipe.train.method != "sft":  # DPO, ORPO, KTO: TRL's preference trainers (train/preference.py)
        from qlora_cli.train.preference import build_preference_trainer as build
    setup = build(recipe, run, console, resuming=checkpoint is not None, callbacks=[stop], display=display,
                  phase=phase)
    trainer, data_stats = setup.trainer, setup.data.stats
    phase(None)  # the loading spinner ends; the announcement and the progress display follow

    # 3. The run directory, starting with the fully resolved recipe (main process only); then train.
    if distributed.is_main_process():
        if checkpoint is None:
            run.create(overwrite)
        else:
            run.prepare_resume(step=int(checkpoint.name.rsplit("-", 1)[1]))
            say(f"resuming from {checkpoint}")
        run.write_recipe(recipe.with_absolute_paths())  # usable from any directory
        if display == "rich":
            _announce(console, recipe, setup, data_stats)
    if setup.process_group is not None:
        setup.process_group.wait_for_everyone()  # the run directory exists before any rank writes a checkpoint
        _per_machine_checkpoints_unless_shared(run, trainer, checkpoint, overwrite, say)
    # On the CPU every step's activations and gradients come from this process's heap: glibc then
    # keeps them for the next step instead of faulting fresh pages in (util/memory.py).
    heap_kept = not torch.cuda.is_available() and keep_freed_heap()
    started = time.perf_counter()
    stop.install()
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    except OSError as exc:
        from qlora_cli.train.checkpoints import (
            WriteFailed,  # a checkpoint's torch.save/safetensors write failed
        )

        if exc.errno not in DISK_ERRNOS and not isinstance(exc, WriteFailed):
            raise
        raise _disk_error(exc, run, resume_command) from None
    except NonFiniteLoss as exc:
        raise StoppedRun(EXIT_USER_ERROR, (
            f"the {exc}. Nothing from that step was applied. "
            f"{_last_checkpoint_text(run)} Lower train.learning_rate (or raise train.warmup_ratio, or use "
            "bfloat16 instead of float16), then train again."
        )) from None
    except Diverged as exc:
        raise StoppedRun(EXIT_USER_ERROR, (
            f"training diverged {exc}. Stopped at step {exc.step} rather than finish with an adapter that "
            f"learned nothing. {exc.checkpoint_text(run.checkpoints)} Lower train.learning_rate, raise "
            "train.warmup_ratio (or train.warmup_steps), or lower train.max_grad_norm, then train again "
            "(--overwrite replaces this run)."
        )) from None
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        # Last: NonFiniteLoss and Diverged are RuntimeErrors too. On the CPU, running out of memory is a
        # RuntimeError as well ("DefaultCPUAllocator: can't allocate memory").
        if not is_out_of_memory(exc):
            raise
        raise StoppedRun(EXIT_USER_ERROR, (
            f"out of memory at step {trainer.state.global_step + 1} (peak {peak_memory_text()}). "
            f"{_last_checkpoint_text(run)} Lower train.batch_size (raise train.gradient_accumulation_steps to "
            "keep the effective batch), turn on train.gradient_checkpointing, or lower data.max_seq_len; "
            f"`{estimate_command}` shows where the memory goes and what fits. Then train again, or continue: "
            f"{resume_command}"
        )) from None
    finally:
        stop.uninstall()
        from qlora_cli.train.progress import RichProgress

        for callback in trainer.callback_handler.callbacks:  # leave the terminal clean on any exit
            if isinstance(callback, RichProgress):
                callback.stop()
    if stop.signum is not None:
        raise StoppedRun(128 + stop.signum, (
            f"{signal_name(stop.signum)} after step {trainer.state.global_step}. {stop.where_to_continue()}"
        ), graceful=True)
    runtime = time.perf_counter() - started
    replicas = replica_check(recipe, trainer, warn)  # every rank takes part
    final_eval = final_evaluation(trainer) if setup.data.val is not None else {}
    if recipe.distributed.sharded:
        # FSDP/DeepSpeed hold the adapter in shards: every rank takes part in gathering it whole.
        if trainer.is_fsdp_enabled:
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        save_adapter = lambda path: trainer.save_model(str(path))  # noqa: E731 (writes on rank 0 only)
        if not trainer.is_world_process_zero():
            save_adapter(run.final_staging)
    else:
        save_adapter = setup.save_adapter or trainer.model.save_pretrained

    # 4. Artifacts: adapter and tokenizer in the standard layout, then summary.json last.
    if trainer.is_world_process_zero():
        from qlora_cli.outputs.model_card import write_model_card
        from qlora_cli.outputs.plots import plot_runs

        try:
            run.save_final(save_adapter, setup.tokenizer, setup.model)
            summary = build_summary(run, trainer, output, final_eval, runtime, data_stats, setup.template,
                                    setup.parameters, setup.model)
            summary["distributed"] = {
                "strategy": recipe.distributed.strategy if distributed.world_size() > 1 else "single process",
                "world_size": distributed.world_size(),
                "global_batch": distributed.global_batch(recipe),  # per device x accumulation x processes
                **replicas,
            }
            summary["cpu_heap_kept"] = heap_kept  # whether keep_freed_heap set glibc's thresholds for the steps
            if checkpoint is not None:
                summary["resumed_from"] = str(checkpoint)
            if recipe.train.method != "sft":
                from qlora_cli.train.preference import preference_summary

                summary["preference"] = preference_summary(recipe, run, final_eval)
            write_model_card(run, recipe, summary)  # replaces PEFT's placeholder card
            plot_runs([run.path], run / LOSS_PLOT)
            run.write_summary(summary)
        except Exception as exc:
            from qlora_cli.train.checkpoints import WriteFailed, write_failure

            # safetensors reports a full disk while saving the adapter as SafetensorError, not OSError.
            failure = exc if isinstance(exc, OSError) else write_failure(exc, run.path)
            if failure is None or (failure.errno not in DISK_ERRNOS and not isinstance(failure, WriteFailed)):
                raise
            raise _disk_error(failure, run, resume_command) from None
    else:
        summary = {}
    return TrainResult(run_dir=run, summary=summary, trainer=trainer)


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}


def _disk_error(exc: OSError, run: RunDir, resume_command: str) -> StoppedRun:
    # strerror: the OS's words, or for a library's failed write, what checkpoints.write_failure made of it.
    return StoppedRun(EXIT_USER_ERROR, (
        f"could not write to {exc.filename or run.path}: {exc.strerror or os.strerror(exc.errno)}. Nothing was "
        "left half written "
        f"(checkpoints and final files are renamed into place). {_last_checkpoint_text(run)} Free space (or lower "
        f"train.save_total_limit), then: {resume_command}"
    ))


def peak_memory_text() -> str:
    from qlora_cli.train.progress import format_memory, peak_memory_gib

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        return f"{format_memory(peak_memory_gib())} of {total:.1f} GiB"
    return format_memory(peak_memory_gib())


def _last_checkpoint_text(run: RunDir) -> str:
    from qlora_cli.train.checkpoints import checkpoints_in, problem

    whole = [c for c in checkpoints_in(run.checkpoints) if problem(c, hashes=False) is None]
    return f"The last checkpoint is {whole[0]}." if whole else "No checkpoint was written yet."


def replica_check(recipe, trainer, warn) -> dict:
    """Under DDP every rank must end with the same adapter. A launch where the model was never
    wrapped in DDP trains one replica per rank, silently; this catches it."""
    if distributed.world_size() == 1 or recipe.distributed.strategy != "ddp":
        return {}
    prints = distributed.gather_fingerprints(trainer.model)
    same = len(set(prints)) == 1
    if not same and distributed.is_main_process():
        warn(f"the ranks ended with different adapters ({', '.join(prints)}): the processes did not train "
             "together (no DDP wrapping?). The saved adapter is rank 0's alone; please report this.")
    return {"replica_fingerprints": prints, "replicas_identical": same}


def _long_examples(recipe: Recipe, data_stats) -> str:
    """What became of the examples longer than max_seq_len, for the start line."""
    if recipe.data.on_too_long == "split":
        return (f"{data_stats.split_documents} split into {recipe.data.max_seq_len}-token blocks "
                f"({data_stats.blocks:,} sequences)")
    return f"{data_stats.truncated} truncated to max_seq_len {recipe.data.max_seq_len}"


def _announce(console, recipe: Recipe, setup: Setup, data_stats) -> None:
    """One paragraph saying what is about to happen, so a wrong setting is caught in the first second."""
    if console is None:
        return
    from rich.markup import escape

    from qlora_cli.data.report import data_warnings

    model, template = setup.model, setup.template
    trainable, total = setup.parameters
    q, lora, t = recipe.quant, recipe.lora, recipe.train
    world = distributed.world_size()
    processes = f" x {world} processes ({recipe.distributed.strategy})" if world > 1 else ""
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    console.print(
        f"[bold]qlora[/] {escape(recipe.model.name_or_path)} in 4-bit {q.quant_type}"
        f"{' + double quant' if q.double_quant else ''}, {q.compute_dtype} compute, on {model.device}\n"
        f"  LoRA r={lora.r} alpha={lora.alpha:g} on {targets}: {trainable:,} trainable of {total:,} parameters\n"
        f"  data: {data_stats.train_rows} train / {data_stats.val_rows} validation rows, "
        f"template {template.name if template else 'none (text)'}, {_long_examples(recipe, data_stats)}, "
        f"{data_stats.dropped_too_long + data_stats.dropped_no_response} "
        f"dropped, {data_stats.bad_rows} bad rows skipped, packing {'on' if recipe.data.packing else 'off'} "
        f"(cache {data_stats.cache})\n"
        f"  batch: {t.batch_size} per device x {t.gradient_accumulation_steps} accumulation{processes} = "
        f"{distributed.global_batch(recipe)} rows per optimizer step\n"
        f"  run directory: {escape(recipe.output.dir)}",
        highlight=False,
        soft_wrap=True,
    )
    for line in data_warnings(data_stats, pairs=recipe.train.method != "sft"):
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters. A 4-bit parameter's numel() counts packed bytes (two weights
    each); its quant_state knows the real shape."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) else p.numel() for p in model.parameters())
    return trainable, total


def final_evaluation(trainer) -> dict:
    """Eval metrics of the final weights; reuses the periodic evaluation when it ran on the last step."""
    for record in reversed(trainer.state.log_history):
        if "eval_loss" in record and record.get("step") == trainer.state.global_step:
            return record
    return trainer.evaluate()


def build_summary(run: RunDir, trainer, output, final_eval: dict, runtime: float, data_stats, template,
                  parameters: tuple[int, int], flops_model=None) -> dict:
    """The facts a user wants after a run, from metrics.jsonl and the trainer state."""
    from qlora_cli.outputs.run_dir import run_segments

    metrics = run.read_metrics()
    segments = run_segments(metrics, trainer.state.global_step, runtime)
    runtime = sum(s["seconds"] for s in segments[:-1]) + runtime  # the whole run's, across resumes
    losses = [m["loss"] for m in metrics if "loss" in m]
    before = [m["eval_loss"] for m in metrics if "eval_loss" in m and m["step"] == 0]
    return {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "first_train_loss": losses[0] if losses else None,
        "last_train_loss": losses[-1] if losses else None,
        "mean_train_loss": output.training_loss,
        "first_eval_loss": before[0] if before else None,  # at step 0: the base model's loss to beat
        "eval_loss": final_eval.get("eval_loss"),
        "runtime_s": round(runtime, 2),
        **({"segments": segments} if len(segments) > 1 else {}),  # a resumed run: each stretch's time
        "tokens_seen": trainer.state.num_input_tokens_seen,
        "throughput": throughput_figures(trainer, data_stats, runtime, flops_model),
        "trainable_params": parameters[0],
        "total_params": parameters[1],
        "template": template.name if template else None,
        # Where the base was quantized: bitsandbytes' CUDA and CPU quantizers can differ by a step
        # in a few double-quantized scales, which `qlora merge` reports when it runs elsewhere.
        "device": trainer.model.device.type,
        "data": {**data_stats.to_dict(), "trained_batches": trained_batching(trainer)},
        "peak_memory": peak_memory(),  # progress.peak_memory: the same numbers the live display shows
        "model_memory": model_memory(flops_model),
        "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_dir": str(Path(run.path).resolve()),
    }


def model_memory(model) -> dict | None:
    """The loaded 4-bit model's bytes, measured (every tensor, quantization constants included)
    against theory (NF4 with double quantization at 4.127 bits per weight plus lookup tables, the
    rest at its dtype): footprint.py. None for FSDP/DeepSpeed, which hold the model in shards."""
    from qlora_cli.model.footprint import footprint

    if model is None or distributed.sharded_model(model):
        return None
    return footprint(model)


def throughput_figures(trainer, data_stats, runtime: float, model) -> dict:
    """Trained (non-padding) tokens per second over the whole training loop, all processes together,
    and the model TFLOP/s that makes (throughput.py; shown on GPUs, where it compares with a peak)."""
    from qlora_cli.train.throughput import achieved_tflops, flops_per_token

    tokens = trainer.state.num_input_tokens_seen
    out = {"tokens_per_s": round(tokens / runtime, 1) if runtime > 0 else None}
    if model is not None and data_stats.train_rows:
        per_token = flops_per_token(model, data_stats.train_tokens / data_stats.train_rows)
        tflops = achieved_tflops(tokens, runtime, per_token)
        out.update(flops_per_token=round(per_token), model_tflops=round(tflops, 3) if tflops is not None else None)
    return out


def trained_batching(trainer) -> dict:
    """Real-token fraction of the rows the trainer actually iterated over (packed or not).

    With packing, TRL's packed dataset has one row per pack with `seq_lengths`; the fraction of
    each max_length row holding real tokens is the packing efficiency.
    """
    ds = trainer.train_dataset
    max_seq_len = trainer.args.max_length  # TRL's name for data.max_seq_len
    if "seq_lengths" not in ds.column_names:
        return {"packed": False, "rows": len(ds)}
    tokens = sum(sum(s) for s in ds["seq_lengths"])
    return {
        "packed": True,
        "rows": len(ds),
        "examples": sum(len(s) for s in ds["seq_lengths"]),
        "packing_efficiency": round(tokens / (len(ds) * max_seq_len), 4),
    }


