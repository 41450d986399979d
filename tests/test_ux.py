"""What a user sees and gets back: starter recipes, the summary panel, loss.png, the model card,
--quiet and --log-format json, `qlora plot`, and plain messages for environment problems."""

from __future__ import annotations

import errno
import json

import pytest
import torch

SHORT = {"train": {"max_steps": 6, "batch_size": 8, "logging_steps": 2, "eval_steps": 3, "save_steps": 2}}
PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        image.verify()
        assert image.size[0] > 300 and image.size[1] > 200


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "prompt_completion", "text"])
def test_init_writes_a_recipe_that_validates(fmt, tmp_path, qlora_main):
    from qlora_cli.recipe.schema import default_template
    from qlora_cli.recipe.load import load_recipe

    out = tmp_path / "recipe.yaml"
    result = qlora_main("init", "--model", "my/model", "--format", fmt, "--output", out)
    assert result.returncode == 0, result.stderr
    recipe = load_recipe(out)
    assert recipe.model.name_or_path == "my/model" and recipe.data.sources[0].format == fmt
    assert (default_template(recipe) is None) == (fmt == "text")
    assert out.read_text().startswith("# yaml-language-server: $schema=")

    again = qlora_main("init", "--format", fmt, "--output", out)  # never overwrites
    assert again.returncode == 2 and "already exists" in again.stderr
    assert load_recipe(out).model.name_or_path == "my/model"


def test_init_rejects_an_unknown_format(tmp_path, qlora_main):
    result = qlora_main("init", "--format", "csv", "--output", tmp_path / "r.yaml")
    assert result.returncode == 2 and "--format" in result.stderr and not (tmp_path / "r.yaml").exists()


def test_summary_panel_model_card_and_loss_png_after_the_tiny_run(tiny_run_proc):
    run_dir, proc = tiny_run_proc
    for command in (f"qlora eval {run_dir}", f'qlora generate {run_dir} --prompt "..."', f"qlora merge {run_dir}"):
        assert command in proc.stderr, proc.stderr[-3000:]
    # The panel wraps its values at the terminal's width (where depends on the run directory's path
    # length): compare its words with the borders and line breaks taken out.
    words = " ".join(proc.stderr.replace("│", " ").split())
    assert "trainable" in words and "real tokens per batch" in words and "peak memory" in words
    _png_ok(run_dir / "loss.png")
    card = (run_dir / "README.md").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "PeftModel.from_pretrained" in card and "More Information Needed" not in card
    assert f"{summary['eval_loss']:.4g}" in card and summary["total_params"] > summary["trainable_params"] > 0


@pytest.mark.slow  # a training run
def test_log_format_json_prints_one_object_per_line(write_recipe, qlora_main):
    result = qlora_main("train", write_recipe(SHORT), "--log-format", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]  # every line parses
    logs = [r for r in records if r["event"] == "log"]
    assert [r["step"] for r in logs if "loss" in r] == [1, 2, 4, 6]
    assert [r["step"] for r in logs if "eval_loss" in r] == [0, 3, 6]
    assert records[-1]["event"] == "done" and records[-1]["summary"]["steps"] == 6
    assert "━" not in result.stderr  # no progress bar mixed in


@pytest.mark.slow  # a training run
def test_quiet_prints_only_the_summary(write_recipe, qlora_main):
    result = qlora_main("train", write_recipe(SHORT), "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/6" not in result.stderr and "━" not in result.stderr
    assert "qlora train: done" in result.stderr and "qlora merge" in result.stderr
    assert result.stdout.strip().endswith("run")


def test_plot_overlays_runs(tiny_run, tmp_path, qlora_main):
    out = tmp_path / "both.png"
    result = qlora_main("plot", tiny_run, tiny_run, "--output", out)
    assert result.returncode == 0, result.stderr
    _png_ok(out)
    bad = qlora_main("plot", tmp_path, "--output", tmp_path / "x.png")
    assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr and not (tmp_path / "x.png").exists()


# --- The environment ---------------------------------------------------------------------------


def test_a_model_id_while_offline_says_what_to_do(write_recipe, tmp_path, qlora_main, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe({"model": {"name_or_path": "someorg/not-downloaded"}})
    result = qlora_main("train", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for needle in ("model.name_or_path", "someorg/not-downloaded", "not in the local cache", "local model directory",
                   "HF_HOME"):
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    # What the CPU allocator raises: a plain RuntimeError.
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_out_of_memory_is_explained(error, write_recipe, tmp_path, qlora_main, monkeypatch):
    from qlora_cli.train.trainer import CheckpointingTrainer

    def oom(self, *args, **kwargs):
        raise error()

    monkeypatch.setattr(CheckpointingTrainer, "training_step", oom)
    result = qlora_main("train", write_recipe(SHORT))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for needle in ("out of memory at step 1", "train.batch_size", "train.gradient_checkpointing", "--resume",
                   "qlora estimate "):
        assert needle in result.stderr, result.stderr


def test_a_full_disk_while_saving_leaves_no_half_checkpoint(write_recipe, tmp_path, qlora_main, monkeypatch):
    from qlora_cli.train import checkpoints
    real, calls = checkpoints.write_manifest, []

    def fill_up(checkpoint):
        calls.append(checkpoint.name)
        if len(calls) == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(checkpoint / "optimizer.pt"))
        real(checkpoint)

    monkeypatch.setattr(checkpoints, "write_manifest", fill_up)
    result = qlora_main("train", write_recipe(SHORT))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "No space left on device" in result.stderr and "checkpoint-2" in result.stderr, result.stderr
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["checkpoint-2"]  # no staging leftovers
    assert checkpoints.problem(ckpts / "checkpoint-2") is None
    assert not (tmp_path / "run" / "summary.json").exists()


def test_missing_bitsandbytes_is_a_clear_error(write_recipe, qlora_main, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    result = qlora_main("train", write_recipe(SHORT))
    assert result.returncode == 2 and "bitsandbytes" in result.stderr and "pip install" in result.stderr
