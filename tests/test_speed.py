"""Speed options reach the trainer, and the run summary reports throughput (issue: performance)."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import tiny_recipe
from qlora_cli.errors import UserError


def _recipe(tiny, tmp_path, *overrides):
    from qlora_cli.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny, tmp_path / "run")))
    return load_recipe(path, list(overrides))


def _args(recipe, tmp_path):
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.train.run import build_sft_config

    return build_sft_config(recipe, RunDir(tmp_path / "run"), has_eval=True, template=None)


def test_speed_defaults_are_the_safe_ones(tiny, tmp_path):
    args = _args(_recipe(tiny, tmp_path, "train.gradient_checkpointing=true"), tmp_path)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.use_liger_kernel is False and args.torch_compile is False
    assert args.packing is False  # packing changes what a step is: opt in (data.packing)


def test_packing_is_padding_free_best_fit(tiny, tmp_path):
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.train.run import build_trainer

    recipe = _recipe(tiny, tmp_path, "data.packing=true")
    trainer = build_trainer(recipe, RunDir(tmp_path / "run"), display="quiet").trainer
    assert trainer.args.packing is True and trainer.args.packing_strategy == "bfd"
    # TRL turns best-fit packing into padding-free batches: one row, no pad tokens, position ids
    # restarting at each example (which the attention keeps apart: tests/test_packing.py).
    assert trainer.padding_free is True and trainer.data_collator.padding_free is True
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    assert (batch["position_ids"] == 0).sum() > 1  # several examples in the one row


def test_torch_compile_reaches_the_trainer(tiny, tmp_path):
    args = _args(_recipe(tiny, tmp_path, "train.torch_compile=true"), tmp_path)
    assert args.torch_compile is True


def test_liger_reaches_the_trainer_and_is_refused_without_a_gpu(tiny, tmp_path, monkeypatch):
    import torch

    from qlora_cli.train.preflight import check_speed_options

    recipe = _recipe(tiny, tmp_path, "train.liger_kernel=true")
    assert _args(recipe, tmp_path).use_liger_kernel is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="train.liger_kernel: .*CUDA GPUs only"):
        check_speed_options(recipe.train)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install 'qlora-cli\[liger\]'"):
        check_speed_options(recipe.train)


def test_attention_choice_reaches_the_model_config(tiny, tmp_path):
    from qlora_cli.model.load import load_base_model

    for choice in ("eager", "sdpa"):
        recipe = _recipe(tiny, tmp_path, f"model.attn_implementation={choice}")
        model = load_base_model(recipe.model, recipe.quant)
        assert model.config._attn_implementation == choice


def test_flops_per_token_counts_qlora_arithmetic(tiny, tmp_path):
    """4 FLOPs per frozen base weight, 6 per trained weight, plus attention scores: by hand."""
    from qlora_cli.model.load import attach_lora, load_base_model
    from qlora_cli.train.throughput import achieved_tflops, flops_per_token

    recipe = _recipe(tiny, tmp_path)  # r=16 on all linear layers; embed_tokens and lm_head trained in full
    model = attach_lora(load_base_model(recipe.model, recipe.quant), recipe.lora, gradient_checkpointing=False)
    c = model.config
    d, f, L, V, q, kv = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, \
        c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]  # q k v o gate up down: (in, out)
    frozen = L * sum(i * o for i, o in shapes)
    lora = L * sum(16 * (i + o) for i, o in shapes)
    trained = lora + d * V  # the trained copy of lm_head (its frozen original never runs)
    assert flops_per_token(model, 50) == 4 * frozen + 6 * trained + 12 * L * q * 50
    assert achieved_tflops(10**6, 2.0, 3e6) == pytest.approx(1.5)
    assert achieved_tflops(0, 2.0, 3e6) is None


def test_summary_reports_throughput(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    speed = summary["throughput"]
    assert speed["tokens_per_s"] == pytest.approx(summary["tokens_seen"] / summary["runtime_s"], rel=0.01)
    assert speed["flops_per_token"] > 0 and speed["model_tflops"] == pytest.approx(
        summary["tokens_seen"] * speed["flops_per_token"] / summary["runtime_s"] / 1e12, rel=0.01, abs=1e-3)
    assert summary["data"]["batching"]["padding_efficiency"] > 0.5
    assert set(summary["peak_memory"]) >= {"cpu_rss_gib"}
    # The 4-bit model as loaded, measured tensor by tensor, against NF4 + double-quant theory.
    weights = summary["model_memory"]
    assert weights["double_quant"] is True and weights["quantized_params"] == 73_728  # 2 layers x (q, k, v, o, gate, up, down)
    assert weights["ratio"] == pytest.approx(1.0, abs=0.03)
    assert weights["bits_per_quantized_param"] == pytest.approx(4.127, abs=0.01)


def _trained(tiny, tmp_path, loss_path: str, **train):
    """Six steps of the tiny recipe with train.loss_path set; (trainer, logged losses, eval losses)."""
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.recipe.load import validate_recipe
    from qlora_cli.train.run import build_trainer

    raw = tiny_recipe(tiny, tmp_path / loss_path)
    raw["train"].update(max_steps=6, logging_steps=1, eval_steps=3, save_steps=1000, loss_path=loss_path, **train)
    trainer = build_trainer(validate_recipe(raw), RunDir(tmp_path / loss_path)).trainer
    trainer.train()
    history = trainer.state.log_history
    return trainer, [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_plain_loss_path_trains_exactly_as_the_fused_one(tiny, tmp_path, accumulation):
    """transformers' loss on the full logits and TRL's fused LM head give the same losses, step by
    step (so the same updates), with and without gradient accumulation; only the fused one logs TRL's
    token accuracy."""
    fused, fused_losses, fused_eval = _trained(tiny, tmp_path, "fused", gradient_accumulation_steps=accumulation)
    plain, plain_losses, plain_eval = _trained(tiny, tmp_path, "plain", gradient_accumulation_steps=accumulation)
    assert fused.fused_loss and not plain.fused_loss
    assert len(plain_losses) == 6 and plain_losses == pytest.approx(fused_losses, rel=1e-5)
    assert plain_eval == pytest.approx(fused_eval, rel=1e-5) and len(plain_eval) == 3  # steps 0, 3, 6
    assert plain_losses[-1] < plain_losses[0]
    assert any("mean_token_accuracy" in h for h in fused.state.log_history)


def test_flops_are_transformers_count_with_the_parameters_counted_once(tiny, tmp_path, monkeypatch):
    """total_flos is what transformers' own floating_point_ops sums, step by step; the model's
    parameters are counted at the first step only, not walked again at every step."""
    from transformers import PreTrainedModel, Trainer

    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.recipe.load import validate_recipe
    from qlora_cli.train.run import build_trainer

    raw = tiny_recipe(tiny, tmp_path / "run")
    raw["train"].update(max_steps=4, logging_steps=1, eval_steps=1000, save_steps=1000)
    trainer = build_trainer(validate_recipe(raw), RunDir(tmp_path / "run")).trainer
    counted, theirs = [], []
    real_count = PreTrainedModel.num_parameters

    def count(model, *args, **kwargs):
        counted.append(1)
        return real_count(model, *args, **kwargs)

    def ours_and_theirs(inputs):
        theirs.append(Trainer.floating_point_ops(trainer, inputs))
        return type(trainer).floating_point_ops(trainer, inputs)

    monkeypatch.setattr(PreTrainedModel, "num_parameters", count)
    monkeypatch.setattr(trainer, "floating_point_ops", ours_and_theirs)
    trainer.train()
    assert len(theirs) == 4 and trainer.state.total_flos == pytest.approx(sum(theirs), rel=1e-9)
    assert len(counted) == 4 + 1  # transformers' four (one a step) and ours, once


def test_auto_takes_the_fused_head_only_where_its_kernel_runs(monkeypatch):
    import torch

    from qlora_cli.train.trainer import fused_loss_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fused_loss_for("auto") is False and fused_loss_for("fused") is True and fused_loss_for("plain") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fused_loss_for("auto") is True


# A loop whose every step allocates and frees 16 blocks of 1 MB, as a training step does its
# activations, in a fresh process: prints what keep_freed_heap returned ("None" when argv[1] says not
# to call it) and the page faults of 30 steps after the first.
_STEPS = """
import resource, sys
import numpy as np
from qlora_cli.util.memory import keep_freed_heap
print(keep_freed_heap() if sys.argv[1] == "keep" else None)
def step():
    blocks = [np.ones(1 << 17) for _ in range(16)]
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(30):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
STEP_PAGES = 30 * 16 * 2**20 // 4096  # 30 steps' blocks, in 4 KB pages


def _step_faults(keep: bool, env: dict | None = None) -> tuple[str, int]:
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _STEPS, "keep" if keep else "default"], env={**clean, **(env or {})},
                         capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept, int(faults)


def test_kept_heap_serves_each_step_from_the_last_ones_memory():
    """With glibc's default thresholds a step's freed 16 MB goes back to the kernel and is faulted in
    again on the next step; with keep_freed_heap the steps reuse it. A user's own malloc settings
    stand."""
    from qlora_cli.util.memory import _libc_function

    if _libc_function("mallopt") is None:
        pytest.skip("not glibc")
    assert _step_faults(keep=False)[1] > 0.9 * STEP_PAGES
    kept, faults = _step_faults(keep=True)
    assert kept == "True" and faults < 0.1 * STEP_PAGES
    kept, faults = _step_faults(keep=True, env={"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert kept == "False" and faults > 0.9 * STEP_PAGES
    assert _step_faults(keep=True, env={"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"})[0] == "False"


def test_a_cpu_run_keeps_its_heap(tiny_run):
    from qlora_cli.util.memory import _libc_function

    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["cpu_heap_kept"] is (_libc_function("mallopt") is not None)
