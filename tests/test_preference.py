"""Preference tuning (train.method dpo, orpo, kto): recipes, data, and real 4-bit runs on the tiny model.

The fast tests check the recipe rules and how preference rows become token ids (rendered by the run's
template exactly as SFT renders them; bad rows counted or refused with their file and line). The slow
ones train: DPO raises the chosen-minus-rejected margin and reward accuracy on its training pairs,
changes the adapter and not the base, and resumes exactly; KTO and ORPO train and report their figures;
a DPO run continues an SFT run's adapter with its template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_recipe
from qlora_cli.errors import UserError
from qlora_cli.recipe.load import load_recipe


def dpo_recipe(tiny: Path, tmp: Path, **sections) -> Path:
    """configs/tiny_dpo.yaml pointed at the session's tiny model and pairs, sections merged in."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny_dpo.yaml").read_text())
    raw["model"]["name_or_path"] = str(tiny / "model")
    raw["data"]["sources"][0]["path"] = str(tiny / "dpo.jsonl")
    raw["output"]["dir"] = str(tmp / "run")
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    path = tmp / f"recipe-{len(list(tmp.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Recipes.


def test_method_and_formats_must_agree(tiny, tmp_path):
    with pytest.raises(UserError) as err:
        load_recipe(dpo_recipe(tiny, tmp_path, train={"method": "sft"}))
    assert "data.sources[0].format" in str(err.value) and "set train.method to dpo, orpo or kto" in str(err.value)
    sft = tiny_recipe(tiny, tmp_path / "run")
    sft["train"]["method"] = "dpo"
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(sft))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert "train.method dpo trains on preference data, not alpaca" in str(err.value)


def test_preference_keys_are_checked_per_method(tiny, tmp_path):
    with pytest.raises(UserError) as err:
        load_recipe(dpo_recipe(tiny, tmp_path, preference={"desirable_weight": 2.0, "betta": 0.2}))
    assert "preference.betta" in str(err.value) and "did you mean 'beta'" in str(err.value)
    with pytest.raises(UserError) as err:
        load_recipe(dpo_recipe(tiny, tmp_path, preference={"desirable_weight": 2.0}))
    assert "preference.desirable_weight" in str(err.value) and "only used by train.method kto" in str(err.value)
    with pytest.raises(UserError) as err:
        load_recipe(dpo_recipe(tiny, tmp_path, train={"method": "kto", "batch_size": 1}))
    assert "train.batch_size" in str(err.value)
    with pytest.raises(UserError) as err:
        load_recipe(dpo_recipe(tiny, tmp_path, data={"packing": True}))
    assert "data.packing" in str(err.value)
    with pytest.raises(UserError) as err:
        load_recipe(dpo_recipe(tiny, tmp_path, distributed={"strategy": "fsdp"}))
    assert "distributed.strategy" in str(err.value) and "use ddp" in str(err.value)
    recipe = load_recipe(dpo_recipe(tiny, tmp_path, preference={"rpo_alpha": 0.5}))
    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.train.preference import build_preference_config

    config = build_preference_config(recipe, RunDir(tmp_path / "run"), has_eval=True)
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [1.0, 0.5]
    assert config.beta == 0.1 and config.max_length == 128


# ---------------------------------------------------------------------------------------------
# Data.


@pytest.fixture(scope="module")
def chatml(tiny):
    from qlora_cli.data.templates import Renderer, apply_template, resolve_template
    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.recipe.schema import ModelSection

    tokenizer = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    template = resolve_template("chatml", tokenizer)
    apply_template(template, tokenizer)
    return tokenizer, Renderer(template, tokenizer)


SHAPES = [
    {"prompt": "What is the opposite of hot?", "chosen": "cold", "rejected": "hot"},
    {"prompt": [{"role": "user", "content": "What is the opposite of hot?"}],
     "chosen": [{"role": "assistant", "content": "cold"}], "rejected": {"role": "assistant", "content": "hot"}},
    {"conversations": [{"from": "human", "value": "What is the opposite of hot?"}],
     "chosen": {"from": "gpt", "value": "cold"}, "rejected": {"from": "gpt", "value": "hot"}},
    {"messages": [{"role": "user", "content": "What is the opposite of hot?"}], "chosen": "cold", "rejected": "hot"},
    {"chosen": [{"role": "user", "content": "What is the opposite of hot?"}, {"role": "assistant", "content": "cold"}],
     "rejected": [{"role": "user", "content": "What is the opposite of hot?"}, {"role": "assistant", "content": "hot"}]},
]


@pytest.mark.parametrize("row", SHAPES, ids=["strings", "conversations", "sharegpt", "messages", "implicit"])
def test_every_pair_shape_scores_exactly_the_replies_after_the_generation_prompt(chatml, row):
    from qlora_cli.data.preference import encode_reply, to_pair

    tokenizer, renderer = chatml
    prompt, chosen, rejected, tools = to_pair(row)
    prompt_ids, chosen_ids = encode_reply(renderer, tokenizer, prompt, chosen, tools)
    prompt_ids_r, rejected_ids = encode_reply(renderer, tokenizer, prompt, rejected, tools)
    # The prompt is what `qlora generate` feeds: the template's generation prompt, tokenized alone.
    generation_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the opposite of hot?"}], add_generation_prompt=True, tokenize=False)
    assert prompt_ids == prompt_ids_r == tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
    # Scored: the reply and the template's stop token, nothing of the prompt.
    assert tokenizer.decode(chosen_ids) == "cold<|im_end|>"
    assert tokenizer.decode(rejected_ids) == "hot<|im_end|>"


BAD = [
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "field 'chosen' is missing or empty"),
    ({"prompt": "hi", "chosen": "a"}, "field 'rejected' is missing or empty"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a",
      "rejected": "b"}, "the prompt must end with a user turn"),
    ({"prompt": "hi", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}, "must be an assistant reply"),
    ({"chosen": "a", "rejected": "b"}, "has no prompt"),
]


def test_bad_pairs_are_skipped_with_counts_and_located(tiny, tmp_path):
    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.model.tokenizer import prepare_tokenizer

    good = [json.loads(line) for line in (tiny / "dpo.jsonl").read_text().splitlines()[:10]]
    data = write_jsonl(tmp_path / "pairs.jsonl", good + [row for row, _ in BAD] + ["{not json"])
    recipe = load_recipe(dpo_recipe(tiny, tmp_path, data={"sources": [{"path": str(data), "format": "preference"}],
                                                          "val_size": 0}, train={"eval_steps": None}))
    tokenizer, template = prepare_tokenizer(recipe)
    prepared = build_preference_datasets(recipe.data, tokenizer, template, seed=1, method="dpo")
    stats = prepared.stats
    assert stats.train_rows == 10 and stats.bad_rows == len(BAD) + 1
    # The first five, each with its file and line.
    for (row, reason), shown in zip(BAD, stats.bad_row_examples):
        assert f"pairs.jsonl: line {11 + BAD.index((row, reason))}: " in shown and reason in shown
    assert set(prepared.train.column_names) >= {"prompt_ids", "chosen_ids", "rejected_ids"}

    strict = recipe.model_copy(update={"data": recipe.data.model_copy(update={"on_bad_row": "error"})})
    with pytest.raises(UserError) as err:
        build_preference_datasets(strict.data, tokenizer, template, seed=1, method="dpo")
    assert "pairs.jsonl: line 11" in str(err.value) and "identical" in str(err.value)


def test_unpaired_rows_need_a_boolean_label(tiny, tmp_path):
    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.model.tokenizer import prepare_tokenizer

    good = [json.loads(line) for line in (tiny / "kto.jsonl").read_text().splitlines()[:6]]
    bad = [{"messages": good[0]["messages"]}, {"messages": good[0]["messages"], "label": "yes"}]
    data = write_jsonl(tmp_path / "kto.jsonl", good + bad)
    recipe = load_recipe(dpo_recipe(tiny, tmp_path, data={
        "sources": [{"path": str(data), "format": "unpaired"}], "val_size": 0}, train={"method": "kto",
                                                                                    "eval_steps": None}))
    tokenizer, template = prepare_tokenizer(recipe)
    prepared = build_preference_datasets(recipe.data, tokenizer, template, seed=1, method="kto")
    assert prepared.stats.train_rows == 6 and prepared.stats.bad_rows == 2
    assert "label' is missing" in prepared.stats.bad_row_examples[0]
    assert "must be true or false" in prepared.stats.bad_row_examples[1]
    assert sorted(prepared.train["label"]) == sorted(r["label"] for r in good)


def test_truncated_pairs_are_told_to_raise_max_seq_len_or_drop_not_to_split(tiny, tmp_path):
    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.data.report import data_warnings
    from qlora_cli.model.tokenizer import prepare_tokenizer

    recipe = load_recipe(dpo_recipe(tiny, tmp_path, data={"max_seq_len": 24, "val_size": 0},
                                    train={"eval_steps": None}))
    tokenizer, template = prepare_tokenizer(recipe)
    stats = build_preference_datasets(recipe.data, tokenizer, template, seed=1, method="dpo").stats
    assert stats.truncated > 0.05 * stats.train_rows
    (warning,) = [w for w in data_warnings(stats, pairs=True) if "truncated" in w]
    assert "raise data.max_seq_len" in warning and "on_too_long: drop" in warning and "split" not in warning


def test_a_file_of_only_bad_pairs_stops_with_the_reasons(tiny, tmp_path):
    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.model.tokenizer import prepare_tokenizer

    data = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD[:2]])
    recipe = load_recipe(dpo_recipe(tiny, tmp_path, data={"sources": [{"path": str(data), "format": "preference"}],
                                                          "val_size": 0}, train={"eval_steps": None}))
    tokenizer, template = prepare_tokenizer(recipe)
    with pytest.raises(UserError) as err:
        build_preference_datasets(recipe.data, tokenizer, template, seed=1, method="dpo")
    text = str(err.value)
    assert "nothing would be trained" in text and "2 are bad rows" in text and "bad.jsonl: line 1" in text


# ---------------------------------------------------------------------------------------------
# Training runs on the tiny model.


def _train(path: Path, *overrides: str, **kwargs):
    from qlora_cli.train.run import train

    return train(load_recipe(path, list(overrides)), display="quiet", **kwargs)


@pytest.fixture(scope="module")
def dpo_run(tiny, tmp_path_factory):
    """20 DPO steps from a fresh adapter; validation = the training pairs themselves, so the figures
    before (step 0) and after are on the pairs it trained on."""
    tmp = tmp_path_factory.mktemp("dpo")
    same = shutil.copy(tiny / "dpo.jsonl", tmp / "same_pairs.jsonl")  # a copy: the recipe refuses one file twice
    path = dpo_recipe(tiny, tmp, data={"val_size": 0, "val_sources": [{"path": str(same), "format": "preference"}]},
                      train={"max_steps": 20, "learning_rate": 5e-3, "eval_steps": 20, "save_steps": 10,
                             "logging_steps": 5, "batch_size": 16})
    return _train(path), path


@pytest.mark.slow
def test_dpo_raises_margin_and_reward_accuracy_on_its_pairs(dpo_run):
    result, _ = dpo_run
    figures = result.summary["preference"]
    before, after = figures["eval_before"], figures["eval_after"]
    # Before any step the policy is the reference: every reward, and so every margin, is exactly 0.
    assert before["rewards/margins"] == 0 and before["rewards/accuracies"] == 0
    assert after["rewards/margins"] > 0.2 and after["rewards/accuracies"] > 0.8
    # The log-probabilities moved the right way: chosen up relative to rejected.
    assert (after["logps/chosen"] - after["logps/rejected"]) > (before["logps/chosen"] - before["logps/rejected"])
    assert result.summary["eval_loss"] < result.summary["first_eval_loss"]
    metrics = result.run_dir.read_metrics()
    assert any("rewards/accuracies" in m for m in metrics) and any("eval_rewards/margins" in m for m in metrics)


@pytest.mark.slow
def test_dpo_changes_the_adapter_not_the_base_and_saves_only_the_policy(dpo_run):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    result, path = dpo_run
    model = result.trainer.model
    assert set(model.peft_config) == {"default", "ref"}  # the reference: a frozen copy of the start
    for name, p in model.named_parameters():
        if ".lora_B.default." in name:
            assert p.abs().sum() > 0, f"{name} never trained"
        if ".lora_B.ref." in name:
            assert p.abs().sum() == 0 and not p.requires_grad  # the fresh start, untouched: the base itself
    from test_train import _fresh_base

    fresh = dict(_fresh_base(load_recipe(path)).named_modules())
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            ref = fresh[name.replace(".base_layer", "")]
            assert torch.equal(module.weight.data, ref.weight.data), f"4-bit weights of {name} changed"
            checked += 1
    assert checked == 2 * 7
    # The run directory holds the trained adapter alone, in the standard layout.
    run = result.run_dir.path
    assert not (Path(run) / "ref").exists()
    saved = load_file(str(Path(run) / "adapter_model.safetensors"))
    assert saved and not any(".ref." in k for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_dpo_stopped_and_resumed_equals_the_uninterrupted_run(dpo_run, tmp_path, sig):
    """SIGKILL (or Ctrl-C, which saves where it stops and exits 130) through the real CLI once
    checkpoint-10 is whole, then --resume: the same adapter and the same logged losses and figures as
    the uninterrupted run (the frozen reference adapter is in the checkpoint too)."""
    import signal

    from safetensors.torch import load_file
    from test_resume import _start, _wait_for_checkpoint

    result, path = dpo_run
    killed = tmp_path / "killed"
    proc = _start(path, killed)
    try:
        _wait_for_checkpoint(proc, killed, 10)
        proc.send_signal(getattr(signal, sig))
    finally:
        _, stderr = proc.communicate(timeout=300)
    assert not (killed / "summary.json").exists(), "the run finished before it was stopped"
    if sig == "SIGINT":
        assert proc.returncode == 130 and "Traceback" not in stderr and "--resume" in stderr, stderr[-2000:]
        saved = sorted(int(c.name.split("-")[1]) for c in (killed / "checkpoints").glob("checkpoint-*"))
        assert saved[-1] > 10  # saved where it stopped
        assert (killed / "checkpoints" / f"checkpoint-{saved[-1]}" / "ref").is_dir()
    resumed = _train(path, output_dir=str(killed), resume="latest")
    run = Path(result.run_dir.path)
    a = load_file(str(run / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)

    def logged(records):
        return [(m["step"], m.get("loss"), m.get("rewards/margins"), m.get("eval_rewards/accuracies"))
                for m in records if not m.get("resumed")]

    assert logged(resumed.run_dir.read_metrics()) == logged(result.run_dir.read_metrics())
    last = max(int(c.name.split("-")[1]) for c in (killed / "checkpoints").glob("checkpoint-*") if c.name != "checkpoint-20")
    assert resumed.summary["steps"] == 20 and resumed.summary["resumed_from"].endswith(f"checkpoint-{last}")
    assert last == 10 if sig == "SIGKILL" else last > 10


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kto", "orpo"])
def test_kto_and_orpo_train_and_report_their_figures(tiny, tmp_path, method):
    source = {"path": str(tiny / ("kto.jsonl" if method == "kto" else "dpo.jsonl")),
              "format": "unpaired" if method == "kto" else "preference"}
    path = dpo_recipe(tiny, tmp_path, data={"sources": [source], "val_size": 16},
                      train={"method": method, "max_steps": 8, "eval_steps": 8, "save_steps": 8,
                             "logging_steps": 4, "batch_size": 8}, preference={"beta": 0.1})
    result = _train(path)
    figures = result.summary["preference"]
    assert figures["method"] == method
    assert figures["train_last"]["rewards/chosen"] is not None
    assert "rewards/margins" in figures["eval_after"]
    assert result.summary["steps"] == 8
    assert (Path(result.run_dir.path) / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_continues_an_sft_runs_adapter_with_its_template(tiny, tmp_path):
    from safetensors.torch import load_file

    sft = tiny_recipe(tiny, tmp_path / "sft")
    sft["train"].update(max_steps=4, eval_steps=None, save_steps=100)
    sft["data"]["val_size"] = 0
    sft_path = tmp_path / "sft.yaml"
    sft_path.write_text(yaml.safe_dump(sft))
    sft_run = _train(sft_path)
    start = load_file(str(Path(sft_run.run_dir.path) / "adapter_model.safetensors"))

    path = dpo_recipe(tiny, tmp_path, model={"adapter": str(sft_run.run_dir.path)},
                      lora={"modules_to_save": ["embed_tokens", "lm_head"]},
                      train={"max_steps": 3, "eval_steps": 3, "save_steps": 3, "logging_steps": 1})
    result = _train(path)
    assert result.summary["template"] == "alpaca"  # the SFT run's, not the preference format's chatml
    recorded = yaml.safe_load((Path(result.run_dir.path) / "recipe.yaml").read_text())
    assert recorded["data"]["template"] == "alpaca"
    after = load_file(str(Path(result.run_dir.path) / "adapter_model.safetensors"))
    assert after.keys() == start.keys()
    assert any(not torch.equal(after[k], start[k]) for k in after if "lora_B" in k)
    # The first step's policy is the SFT model and so is the reference: rewards start at 0.
    assert result.summary["preference"]["train_first"]["rewards/margins"] == 0

    wrong = dpo_recipe(tiny, tmp_path, model={"adapter": str(sft_run.run_dir.path)}, lora={"r": 4})
    with pytest.raises(UserError) as err:
        _train(wrong, output_dir=str(tmp_path / "wrong"))
    assert "model.adapter" in str(err.value) and "lora.r is 4 but the adapter has 16" in str(err.value)
    assert not (tmp_path / "wrong").exists()  # refused before anything was written


def test_estimate_counts_both_replies_and_the_reference_adapter(tiny, tmp_path):
    from qlora_cli.estimate import estimate

    dpo = load_recipe(dpo_recipe(tiny, tmp_path))
    sft = load_recipe(dpo_recipe(tiny, tmp_path, train={"method": "sft"},
                                 data={"sources": [{"path": str(tiny / "chat.jsonl"), "format": "messages"}]}))
    a, b = estimate(dpo, gpu=False), estimate(sft, gpu=False)
    # Chosen and rejected run as one batch of twice the rows: twice the activations and logits.
    assert a.parts["activations"] == pytest.approx(2 * b.parts["activations"])
    assert a.parts["reference adapter (frozen copy of the starting adapter)"] == a.trainable_params * 4
    assert "reference adapter (frozen copy of the starting adapter)" not in b.parts
    assert a.total > b.total


@pytest.mark.slow
def test_a_dpo_run_merges_generates_and_evaluates_like_any_run(dpo_run, tmp_path, qlora_main):
    result, _ = dpo_run
    run = tmp_path / "run"
    shutil.copytree(result.run_dir.path, run)  # the module's run is shared: work on a copy
    merged = qlora_main("merge", str(run), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report  # the fidelity check ran on the run's own pairs (chosen replies), rendered as trained
    answer = qlora_main("generate", str(run), "--prompt", "What is the opposite of hot?", "--greedy",
                        "--max-new-tokens", "4")
    assert answer.returncode == 0, answer.stderr[-2000:]
    scored = qlora_main("eval", str(run), "--split", "train", "--compare-base", "--max-samples", "32", "--json")
    assert scored.returncode == 0, scored.stderr[-2000:]
    figures = json.loads(scored.stdout)
    assert figures["reference"] == "base (adapter disabled)"
    # Trained on these pairs: the run ranks chosen above rejected more often than the base does.
    assert figures["metrics"]["reward_accuracy"] > 0.8 and figures["metrics"]["reward_margin"] > 0
    assert figures["delta"]["logp_margin"] > 0
    assert json.loads((run / "eval_results.json").read_text())["metrics"] == figures["metrics"]


def test_kto_reads_pairs_as_a_desirable_and_an_undesirable_reply(tiny, tmp_path):
    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.model.tokenizer import prepare_tokenizer

    pairs = write_jsonl(tmp_path / "pairs.jsonl", (tiny / "dpo.jsonl").read_text().splitlines()[:5])
    unpaired = write_jsonl(tmp_path / "kto.jsonl", (tiny / "kto.jsonl").read_text().splitlines()[:3])
    recipe = load_recipe(dpo_recipe(tiny, tmp_path, train={"method": "kto", "eval_steps": None}, data={
        "sources": [{"path": str(pairs), "format": "preference"}, {"path": str(unpaired), "format": "unpaired"}],
        "val_size": 0}))
    tokenizer, template = prepare_tokenizer(recipe)
    prepared = build_preference_datasets(recipe.data, tokenizer, template, seed=1, method="kto")
    assert prepared.stats.train_rows == 2 * 5 + 3
    labels = prepared.train["label"]
    assert sum(labels) == 5 + sum(json.loads(line)["label"] for line in unpaired.read_text().splitlines())
    train, _ = prepared.for_trainer()
    assert train.column_names == ["prompt_ids", "completion_ids", "label"]


@pytest.mark.slow
def test_dpo_trains_in_two_processes_on_the_cpu(tiny, tmp_path):
    from conftest import run_cli

    path = dpo_recipe(tiny, tmp_path, train={"max_steps": 3, "eval_steps": 3, "save_steps": 3, "batch_size": 4,
                                             "logging_steps": 1})
    proc = run_cli("train", str(path), "--nproc", "2", "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["distributed"]["replicas_identical"]
    assert summary["distributed"]["global_batch"] == 8
    assert "rewards/margins" in summary["preference"]["eval_after"]


@pytest.mark.slow
def test_sft_continues_an_earlier_adapter_exactly_where_it_ended(tiny, tmp_path):
    first = tiny_recipe(tiny, tmp_path / "first")
    first["train"].update(max_steps=4, eval_steps=4, save_steps=100, logging_steps=2)
    first_path = tmp_path / "first.yaml"
    first_path.write_text(yaml.safe_dump(first))
    before = _train(first_path)

    second = tiny_recipe(tiny, tmp_path / "second")
    second["model"]["adapter"] = str(before.run_dir.path)
    second["data"]["template"] = None  # taken from the first run
    second["train"].update(max_steps=2, eval_steps=2, save_steps=100, logging_steps=1)
    second_path = tmp_path / "second.yaml"
    second_path.write_text(yaml.safe_dump(second))
    after = _train(second_path)
    # The same validation rows, the same weights (fp32, not rounded by TRL's bf16 cast): the same loss.
    assert after.summary["first_eval_loss"] == before.summary["eval_loss"]
    assert after.summary["eval_loss"] < after.summary["first_eval_loss"]
    assert yaml.safe_load((Path(after.run_dir.path) / "recipe.yaml").read_text())["model"]["adapter"] == str(
        Path(before.run_dir.path).absolute())
