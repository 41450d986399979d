"""A run that diverges without a NaN: the loss spikes, then the adapter gets no gradient at all and
the loss sits flat (issue 23, item 11: learning_rate 1e3 on the tiny recipe finished with exit 0 and
a dead adapter). DivergenceGuard warns at the first bad log and stops after a few in a row; normal
runs, a spike that recovers and a legitimately converged run are left alone.
"""

from __future__ import annotations

import json

import pytest
from transformers import TrainerState

from qlora_cli.train import checkpoints
from qlora_cli.train.trainer import BAD_LOGS_TO_STOP, Diverged, DivergenceGuard

# The run (logging_steps 10): 6.60, 6.57, a spike to 6951, then exactly 6.238 (the loss of
# a uniform guess over the tiny model's 512 tokens) with grad_norm 0.0 for the rest of the run.
COLLAPSE = [(1, 6.60, 3.77), (10, 6.57, 2.9), (20, 6951.0, 3.1e4), (30, 6.238, 0.0), (40, 6.238, 0.0),
            (50, 6.238, 0.0), (60, 6.238, 0.0)]


def _feed(guard: DivergenceGuard, state: TrainerState, records) -> None:
    """Log (step, loss, grad_norm) records the way Trainer.log does: into log_history, then on_log."""
    for step, loss, grad_norm in records:
        state.global_step = step
        logs = {"loss": loss, "grad_norm": grad_norm, "learning_rate": 1e-3}
        state.log_history.append({**logs, "step": step})
        guard.on_log(None, state, None, logs=logs)


def _guard():
    warnings = []
    return DivergenceGuard(warn=warnings.append), TrainerState(), warnings


def test_collapse_warns_at_the_spike_then_stops_on_the_dead_adapter():
    guard, state, warnings = _guard()
    with pytest.raises(Diverged) as stopped:
        _feed(guard, state, COLLAPSE)
    # The spike and two logs without gradient: three bad logs in a row, so it stops at step 40.
    assert BAD_LOGS_TO_STOP == 3 and stopped.value.step == 40 and state.global_step == 40
    assert stopped.value.last_good_step == 10  # checkpoints up to step 10 predate it
    assert "at steps 20, 30, 40" in str(stopped.value) and "grad_norm is 0" in str(stopped.value)
    assert len(warnings) == 1 and warnings[0].startswith("step 20: the loss is 6951") and "10x" in warnings[0]


def test_an_infinite_gradient_norm_every_step_stops_the_run():
    # lora.alpha=1e30 with a large rate: grad_norm inf at every step, the loss flat, nothing learned.
    guard, state, warnings = _guard()
    with pytest.raises(Diverged) as stopped:
        _feed(guard, state, [(1, 6.6, float("inf")), (2, 6.6, float("inf")), (3, 6.6, float("inf"))])
    assert stopped.value.step == 3 and "grad_norm is inf" in str(stopped.value)


def test_a_resumed_run_stops_where_the_uninterrupted_one_does():
    guard, state, _ = _guard()
    _feed(guard, state, COLLAPSE[:4])  # interrupted after step 30's checkpoint...
    resumed, _, warnings = _guard()
    resumed.on_train_begin(None, state, None)  # ...its trainer_state.json holds the log history
    with pytest.raises(Diverged) as stopped:
        _feed(resumed, state, COLLAPSE[4:])
    assert stopped.value.step == 40 and stopped.value.last_good_step == 10 and warnings == []


@pytest.mark.parametrize("records", [
    # The tiny recipe: ~6.6 down to ~0.3, gradient norms shrinking but far from zero.
    [(1, 6.6, 4.4), *[(s, 6.6 * 0.985 ** s, 2.0 * 0.99 ** s) for s in range(10, 201, 10)]],
    # Legitimately converged: every token predicted with probability 1 in float32, so the gradient
    # really is zero; the loss is ~0, not stuck high.
    [(1, 2.0, 3.0), (10, 0.01, 0.05), *[(s, 1e-8, 0.0) for s in range(20, 101, 10)]],
    # Gradients tiny but present at the end of a run that still learns.
    [(1, 2.0, 3.0), *[(s, 0.3, 1e-9) for s in range(10, 101, 10)]],
])
def test_healthy_runs_are_left_alone(records):
    guard, state, warnings = _guard()
    _feed(guard, state, records)
    assert warnings == []


def test_a_spike_that_recovers_only_warns():
    guard, state, warnings = _guard()
    _feed(guard, state, [(1, 6.6, 4.0), (10, 5.0, 2.0), (20, 80.0, 500.0), (30, 70.0, 300.0), (40, 4.0, 2.0),
                         (50, 3.5, 1.5), (60, 3.0, 1.4)])
    assert len(warnings) == 1 and "step 20" in warnings[0]


@pytest.mark.slow  # a training run
def test_diverging_run_stops_with_the_recipe_keys_to_change(write_recipe, qlora_main):
    # learning_rate 1e3: the loss jumps to thousands by step 4, then the adapter is dead (exact
    # uniform prediction, grad_norm 0.0). Without the guard this ran all 30 steps and exited 0.
    recipe = write_recipe({"train": {"learning_rate": 1e3, "max_steps": 30, "batch_size": 8, "logging_steps": 2,
                                     "save_steps": 4, "eval_steps": 30}})
    run_dir = recipe.parent / "run"
    result = qlora_main("train", recipe)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "warning:" in result.stderr and "training diverged at steps" in result.stderr
    for key in ("train.learning_rate", "train.warmup_ratio", "train.warmup_steps", "train.max_grad_norm"):
        assert key in result.stderr
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert max(steps) < 30  # stopped early, not a finished run
    assert not (run_dir / "summary.json").exists() and not (run_dir / "adapter_model.safetensors").exists()
    # Checkpoints are kept (whole) and the message says which ones hold the diverged adapter.
    saved = checkpoints.checkpoints_in(run_dir / "checkpoints")
    assert saved and all(checkpoints.problem(c) is None for c in saved)
    assert f"{saved[0].name}) holds the diverged adapter" in result.stderr


def test_the_tiny_recipe_is_not_mistaken_for_a_diverging_run(tiny_run_proc):
    run_dir, proc = tiny_run_proc
    assert "diverged" not in proc.stderr and "gets no gradient" not in proc.stderr and "warning: step" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["last_train_loss"] < 1.0
