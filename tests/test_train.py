"""End to end on the tiny model: the real CLI, the run directory, and what training did to the weights."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import tiny_recipe
from qlora_cli.recipe.load import load_recipe

RUN_FILES = {
    "README.md",  # the model card (ours, in place of PEFT's template)
    "loss.png",
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",  # with the run's stop token, for plain generate() (serving.py)
    "recipe.yaml",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    ".qlora-run.json",  # the marker: what qlora wrote here (rundir.py)
    ".qlora-run.lock",  # the one-writer lock, released but kept (rundir.RunLock)
}


@pytest.fixture()
def cli_run(tiny_run_proc):
    """`qlora train` on configs/tiny.yaml as shipped (only paths changed), in a subprocess (conftest)."""
    return tiny_run_proc


def test_run_directory_holds_exactly_the_expected_files(cli_run):
    run_dir, proc = cli_run
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES
    assert not (run_dir.parent / "elsewhere").exists()  # --output-dir replaced output.dir
    assert proc.stdout.strip() == str(run_dir)  # stdout is just the run dir, for scripts
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["checkpoint-100", "checkpoint-200"]


def test_loss_falls_and_eval_loss_halves(cli_run):
    run_dir, _ = cli_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 200
    assert summary["last_train_loss"] < 0.6 * summary["first_train_loss"]
    # The tiny recipe's promise: eval loss falls by at least half.
    assert summary["eval_loss"] <= 0.5 * summary["first_eval_loss"]
    assert summary["tokens_seen"] > 0 and summary["runtime_s"] > 0
    assert summary["versions"]["peft"] and summary["versions"]["bitsandbytes"]
    assert summary["peak_memory"]["cpu_rss_gib"] > 0


def test_metrics_log_has_one_record_per_logging_step(cli_run):
    run_dir, _ = cli_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1] + list(range(10, 201, 10))  # logging_first_step + every 10
    assert [r["step"] for r in evals] == [0, 50, 100, 150, 200]  # eval_on_start + every 50
    for r in train:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "epoch"} <= r.keys()


def test_recipe_yaml_is_the_fully_resolved_recipe(cli_run):
    run_dir, _ = cli_run
    saved = load_recipe(run_dir / "recipe.yaml")
    assert saved.output.dir == str(run_dir)  # --output-dir is recorded
    assert saved.quant.quant_type == "nf4" and saved.quant.double_quant  # defaults written out
    raw = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert "use_rslora" in raw["lora"] and "save_total_limit" in raw["train"]


def test_progress_display_shows_step_loss_lr_and_throughput(cli_run):
    _, proc = cli_run
    assert "step 200/200" in proc.stderr
    # stderr is a pipe here, so the live display draws no frames (issue 24 item 3): the plain line per
    # log is the record. The live line's fields are tested in tests/test_first_day_display.py.
    for field in ("loss ", "learning_rate ", "grad_norm ", "eval_loss "):
        assert field in proc.stderr, field
    assert "ETA" not in proc.stderr and "step/s" not in proc.stderr
    assert "Traceback" not in proc.stderr


# --- In-process: the weights themselves --------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A short run through train(), keeping the live trainer to compare against."""
    from qlora_cli.train.run import train

    tmp = tmp_path_factory.mktemp("inproc")
    recipe = tiny_recipe(tiny, tmp / "run")
    recipe["train"].update(max_steps=30, eval_steps=None, save_steps=1000)
    recipe["data"]["val_size"] = 0
    recipe["lora"]["dropout"] = 0.1  # dropout must be off at inference: reload must still match
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return train(load_recipe(path))


def _fresh_base(recipe):
    """The base model quantized from scratch with plain transformers + bitsandbytes.

    One bitsandbytes switch is turned off: on AVX512-BF16 CPUs, no-grad forwards otherwise move
    to a repacked bf16 kernel whose logits differ from the training kernel's by ~2e-2, which
    would hide (or fake) a real adapter mismatch. GPUs have no such second path.
    It goes where training put its model (the GPU when there is one): bitsandbytes' CUDA and CPU
    quantizers can differ by one step in a double-quantized scale, so a reference quantized
    elsewhere would not be bit-identical.
    """
    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_cli.model.load import device_map

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.name_or_path, quantization_config=bnb, dtype=torch.float32, device_map=device_map()
    )
    for module in model.modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _probe_batch(tokenizer):
    texts = ["Count from 3 to 7.", "What is the opposite of hot?"]
    messages = [[{"role": "user", "content": t}] for t in texts]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
    )


def test_lora_weights_changed_and_base_weights_did_not(trained):
    import bitsandbytes as bnb

    model = trained.trainer.model
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b, "no LoRA parameters found"
    # PEFT initialises B to zero; after training, every adapted module has moved.
    for name, p in lora_b.items():
        assert p.abs().sum() > 0, f"{name} never trained"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

    fresh = dict(_fresh_base(load_recipe_of(trained)).named_modules())
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref = fresh[name.replace(".base_layer", "")]
            assert torch.equal(module.weight.data, ref.weight.data), f"4-bit weights of {name} changed"
            assert torch.equal(module.weight.quant_state.absmax, ref.weight.quant_state.absmax)
            checked += 1
    assert checked == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    fresh_params = dict(_fresh_base(load_recipe_of(trained)).named_parameters())
    saved = 0
    for name, p in model.base_model.model.named_parameters():
        if "lora_" in name or not p.dtype.is_floating_point:
            continue
        if ".modules_to_save." in name:  # the trained full copies (embed_tokens, lm_head): they moved
            ref = fresh_params[name.replace(".modules_to_save.default", "")]
            assert not torch.equal(p.float(), ref.float()), f"{name} never trained"
            saved += 1
            continue
        # ...while everything else, the originals behind those copies included, is untouched.
        ref = fresh_params[name.replace(".base_layer", "").replace(".original_module", "")]
        torch.testing.assert_close(p.float(), ref.float(), rtol=0, atol=0, msg=name)
    assert saved == len(load_recipe_of(trained).lora.modules_to_save)


def test_reloaded_adapter_reproduces_training_logits(trained):
    from peft import PeftModel

    model = trained.trainer.model.eval()
    tokenizer = trained.trainer.processing_class
    batch = _probe_batch(tokenizer).to(model.device)
    with torch.no_grad():
        expected = model(**batch).logits

    reloaded = PeftModel.from_pretrained(_fresh_base(load_recipe_of(trained)), str(trained.run_dir.path)).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # ...and the adapter matters: without it the logits are different.
    with torch.no_grad(), reloaded.disable_adapter():
        base = reloaded(**batch).logits
    assert (base - expected).abs().max() > 1e-2


def load_recipe_of(result):
    return load_recipe(result.run_dir / "recipe.yaml")
