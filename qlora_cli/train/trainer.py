"""TRL's SFTTrainer, with the guarantees `qlora train` makes about a run that stops early.

1. Checkpoints are whole or absent: each is written to RUN/checkpoints/.staging/checkpoint-N,
   given a manifest (checkpoints.py), and renamed into place. Old ones are rotated away only
   after the new one is in place.
2. The first SIGINT/SIGTERM finishes the current optimizer step, saves a checkpoint and stops;
   `train` then exits 130/143 saying how to resume. A second signal exits at once (the protocol,
   across processes too, is stopping.py's GracefulStop).
3. A NaN or inf loss stops the run before the optimizer applies that step, so the last
   checkpoint stays good. A run that has diverged without a NaN (the adapter gets no gradient any
   more, or the loss sits orders of magnitude above where it started) stops too (DivergenceGuard).
4. A resumed run logs what the uninterrupted run logs: each checkpoint also holds the loss summed
   since the last log (checkpoints.LOG_WINDOW), so a stop between two logging steps loses nothing.

The loop itself (optimizer, scheduler, RNG state, skipping already-seen batches on resume) is
transformers' own; only these edges are ours.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather
from trl import SFTTrainer

from qlora_cli.train import checkpoints


class NonFiniteLoss(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss is {loss} at step {step}")
        self.step, self.loss = step, loss


class Diverged(RuntimeError):
    """The run no longer trains (DivergenceGuard): `last_good_step` is the last logged step that looked healthy."""

    def __init__(self, step: int, reason: str, last_good_step: int):
        super().__init__(reason)
        self.step, self.last_good_step = step, last_good_step

    def checkpoint_text(self, root: Path) -> str:
        """Which checkpoints predate the divergence: the newest ones may hold the diverged adapter.
        Nothing is deleted; the user decides."""
        whole = [c for c in checkpoints.checkpoints_in(root) if checkpoints.problem(c, hashes=False) is None]
        good = [c for c in whole if checkpoints.step_of(c) <= self.last_good_step]
        after = [c.name for c in whole if c not in good]
        if not whole:
            return "No checkpoint was written yet."
        if not good:
            return f"Every checkpoint ({', '.join(after)}) holds the diverged adapter."
        text = f"The last checkpoint from before it diverged is {good[0]}."
        return text + (f" ({', '.join(after)} {'holds' if len(after) == 1 else 'hold'} the diverged adapter.)"
                       if after else "")


class CheckpointingMixin:
    """The guarantees above, for any TRL trainer that keeps TRL's `_metrics` and `_total_train_tokens`
    (SFTTrainer here; DPOTrainer and KTOTrainer in train/preference.py). Listed before the trainer
    class in the bases, so its overrides wrap the trainer's.

    It overrides and reads private parts of transformers' Trainer and TRL's trainers; each is
    listed in util/libraries.py's PRIVATE_APIS and pinned by tests/test_library_contracts.py.
    """

    def __init__(self, *args, keep_checkpoints: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self._staging: Path | None = None
        self._resumed_from: Path | None = None
        self._flops_per_token: int | None = None  # floating_point_ops, worked out at the first step
        self.add_callback(_RestoreLogWindow(self))
        self.add_callback(DivergenceGuard())

    def train(self, resume_from_checkpoint: str | None = None, *args, **kwargs):
        # Remembered so that _RestoreLogWindow can read the checkpoint's log window once the loop has
        # set up its own (empty) one. train.py passes a path or None, never True.
        self._resumed_from = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def floating_point_ops(self, inputs) -> int:
        """transformers' count for `total_flos`, its own formula asked once: the Trainer counts the
        model's parameters again at every step (a walk over every tensor, 2-3% of a tiny step on the
        CPU), and how many there are never changes during training. FSDP and DeepSpeed, which reshape
        parameters as they shard them, are asked every step as before."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or main_input not in inputs:
            return super().floating_point_ops(inputs)
        tokens = inputs[main_input].numel()
        if self._flops_per_token is None and tokens:
            self._flops_per_token = super().floating_point_ops(inputs) // tokens
        return tokens * self._flops_per_token if self._flops_per_token is not None else 0

    def create_model_card(self, *args, **kwargs) -> None:
        """Nothing: TRL writes a generic card ("fine-tuned version of [None]") into checkpoints/ at
        every save; the run's card is RUN/README.md, written from the recipe (outputs/model_card.py)."""

    def _get_output_dir(self, trial) -> str:
        # transformers writes checkpoint-N under this directory; while saving, that is the staging area.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        root = Path(self.args.output_dir)
        self._staging = root / checkpoints.STAGING
        staged = self._staging / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            # PEFT's save_pretrained leaves its template card ("More Information Needed") in each
            # checkpoint: the run's card is RUN/README.md, so a checkpoint carries none.
            (staged / "README.md").unlink(missing_ok=True)
            window = self._log_window()  # every process: it gathers the loss across processes
            if self.args.should_save:
                checkpoints.write_log_window(staged, window)  # before publish: the manifest covers it
            # Every process writes its own RNG state into the staging directory: let them all
            # finish before the main process publishes it.
            self.accelerator.wait_for_everyone()
            if self.args.should_save:  # the main process owns the files
                checkpoints.publish(staged, root)
                checkpoints.rotate(root, self.keep_checkpoints)
        except BaseException as exc:
            # torch.save and safetensors report a full disk as RuntimeError/SafetensorError, not
            # OSError: name it for what it is (train.py says what to do). Looked at before the
            # cleanup below frees the space the failed write used.
            failure = checkpoints.write_failure(exc, staged)
            # A full disk, a signal: drop the half-written copy (it was never a checkpoint) so it
            # does not hold the space the next attempt needs.
            shutil.rmtree(staged, ignore_errors=True)
            try:
                staged.parent.rmdir()
            except OSError:
                pass
            if failure is not None:
                raise failure from exc
            raise
        finally:
            self._staging = None

    def _log_window(self) -> dict:
        """What the next log will average over, from the steps since the last one.

        The Trainer sums the loss of every step into `_tr_loss` and logs sum / steps at each logging
        step; TRL likewise keeps per-step entropy and token accuracy in `_metrics` and a running
        token count. A checkpoint taken between two logging steps (a graceful stop, or save_steps
        not a multiple of logging_steps) would otherwise lose that partial window, and the first
        log after --resume would average only the steps since the resume.
        """
        return {
            "global_step": self.state.global_step,
            "last_logged_step": self._globalstep_last_logged,
            # Each process sums its own losses and the log averages the processes' sums: keep the
            # average (exactly the float32 sum when there is one process).
            "loss_sum": nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item(),
            # Already gathered across processes by TRL.
            "trl_metrics": {key: list(values) for key, values in self._trl_train_metrics().items()},
            "trl_total_train_tokens": getattr(self, "_total_train_tokens", 0),
        }

    def _trl_train_metrics(self) -> dict:
        """Where the TRL trainer keeps the training metrics of the current log window."""
        return self._metrics["train"]

    def _restore_log_window(self) -> None:
        """Continue the log window saved with the checkpoint being resumed (see _log_window)."""
        if self._resumed_from is None:
            return
        window = checkpoints.read_log_window(self._resumed_from)
        if window is None or window["global_step"] != self.state.global_step:
            return  # a checkpoint from before log windows were saved: the first log averages fewer steps
        # float32 -> JSON float -> float32 is exact, so the following steps' additions give the same
        # sum as the uninterrupted run. (In place, like the Trainer's own reset of this tensor.)
        self._tr_loss.fill_(window["loss_sum"])
        self._globalstep_last_logged = window["last_logged_step"]
        # The steps before the resume are not part of this call's average `training_loss`
        # (summary.json's mean_train_loss): keep it over this call's steps, as before.
        self._total_loss_scalar -= window["loss_sum"]
        metrics = self._trl_train_metrics()
        metrics.clear()
        metrics.update({key: list(values) for key, values in window["trl_metrics"].items()})
        if hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = window["trl_total_train_tokens"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        value = loss.detach().float().item()
        if not math.isfinite(value):
            # Raised before the optimizer step that would apply these gradients.
            raise NonFiniteLoss(self.state.global_step + 1, value)
        return loss


class CheckpointingTrainer(CheckpointingMixin, SFTTrainer):
    """SFTTrainer whose checkpoints appear atomically and whose loss is checked every micro-step."""

    def __init__(self, *args, fused_loss: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_loss = fused_loss  # train.loss_path, resolved (fused_loss_for)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's fused LM head, or transformers' own loss on the full logits (train.loss_path: plain).

        Both give the loss summed over the trained tokens and divided by their count across the
        batch and its accumulation steps; the plain path leaves out TRL's entropy and token-accuracy
        metrics, which the fused head computes from its chunks for free."""
        if self.fused_loss:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class _RestoreLogWindow(TrainerCallback):
    """Hands the resumed checkpoint's log window to the trainer. on_train_begin is the first moment
    after the loop has reset its accumulators and before the first step adds to them."""

    def __init__(self, trainer: CheckpointingMixin):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._restore_log_window()


# What DivergenceGuard calls a collapsed run. Each condition must hold at this many consecutive
# logged steps (logging_steps apart, so at least that many optimizer steps) before the run stops;
# the first one only warns, so a single spike that recovers costs nothing.
BAD_LOGS_TO_STOP = 3
# "No gradient": the logged grad_norm is the norm before clipping (max_grad_norm cannot hide a real
# gradient), and a run that still learns, even one that has converged, has a norm many orders of
# magnitude above this (the tiny recipe ends near 0.5). A dead run logs exactly 0.0.
ZERO_GRAD_NORM = 1e-12
# ...unless the model already predicts every target token with probability ~1: then the softmax
# saturates in float32 and the gradient really is zero. That only happens below ~1e-7 nats per
# token; a collapsed adapter sits far above this (the tiny recipe's dead run: 6.24, the loss of a
# uniform guess over its 512 tokens).
CONVERGED_LOSS = 1e-3
# "Spike": a loss this many times the first logged one (the loss before any update, as train.py
# logs the first step). Normal fine-tuning only lowers the loss; 10x means the adapter now makes
# the base model far worse than it was, i.e. the weights blew up.
SPIKE_FACTOR = 10.0
# Floor for the reference, in nats per token, so that a run starting near zero loss (data the model
# already knows) does not call noise a spike: 10 x 1 nat is worse than a uniform guess among
# e^10 = 22,000 tokens.
SPIKE_FLOOR = 1.0


class DivergenceGuard(TrainerCallback):
    """Stops a run that has diverged without producing a NaN (that one is NonFiniteLoss's): the
    adapter gets no gradient any more (a dead adapter: the loss then stays flat, and the run would
    finish with exit 0 and an adapter that learned nothing), or the loss stays orders of magnitude
    above where it started. Raises Diverged from on_log, before that step's evaluation and
    checkpoint, so no further checkpoint of the diverged adapter is written.

    Its only state is read back from the log history, which the checkpoint's trainer_state.json
    holds, so a resumed run stops exactly where the uninterrupted run would.
    """

    def __init__(self, warn=None):
        self.warn = warn or _warn
        self._reset()

    def _reset(self) -> None:
        self.reference: float | None = None  # the first logged loss
        self.bad: list[tuple[int, str]] = []  # (step, why) of the current run of bad logs
        self.last_good_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()
        for record in state.log_history:  # on resume: the logs up to the checkpoint
            if "loss" in record:
                self._check(record["step"], record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        why = self._check(state.global_step, logs)
        if why is None:
            return
        if len(self.bad) >= BAD_LOGS_TO_STOP:
            steps = ", ".join(str(step) for step, _ in self.bad)
            raise Diverged(state.global_step, f"at steps {steps}: {why}", self.last_good_step)
        if len(self.bad) == 1 and state.is_world_process_zero:
            self.warn(f"step {state.global_step}: {why}. The run stops if this lasts {BAD_LOGS_TO_STOP} logs in a "
                      "row (train.learning_rate too high?).")

    def _check(self, step: int, logs: dict) -> str | None:
        """Record one logged step; return why it is bad, or None if it looks healthy."""
        loss, grad_norm = logs["loss"], logs.get("grad_norm")
        if self.reference is None:
            self.reference = loss
        limit = SPIKE_FACTOR * max(self.reference, SPIKE_FLOOR)
        why = None
        if grad_norm is not None and grad_norm < ZERO_GRAD_NORM and loss > CONVERGED_LOSS:
            why = f"grad_norm is {grad_norm:g} with the loss at {loss:.4g}: the adapter gets no gradient and no longer learns"
        elif grad_norm is not None and not math.isfinite(grad_norm):
            # Clipping scales an infinite gradient to nothing (or NaN): the step changes nothing.
            why = f"grad_norm is {grad_norm:g}: the gradient overflows, so clipping leaves no update (lora.alpha too large?)"
        elif loss > limit:
            why = (f"the loss is {loss:.4g}, over {SPIKE_FACTOR:g}x the first logged loss "
                   f"({self.reference:.4g})")
        if why is None:
            self.bad = []
            self.last_good_step = step
        else:
            self.bad.append((step, why))
        return why


def fused_loss_for(loss_path: str) -> bool:
    """train.loss_path resolved: auto takes the fused head where its Triton kernel runs (CUDA), and
    transformers' plain loss elsewhere, where folding the chunks in plain torch costs more than the
    full logits (benchmarks/bench_loss_path.py)."""
    import torch

    from qlora_cli.estimate import fused_loss  # the one rule, which `qlora estimate` applies to the GPU it sizes

    return fused_loss(loss_path, gpu=torch.cuda.is_available())


def _warn(text: str) -> None:
    # stderr, like train.py's warnings; while the live display runs, rich prints this above it.
    from rich.console import Console

    Console(stderr=True).print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)
