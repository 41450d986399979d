"""`qlora eval`: the numbers against transformers' own loss, the adapter against its bare base, the
generation metrics against the rows the demo trains on, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml


def _user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    """A private copy of the demo run, since eval writes eval_results.json into its target."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def test_adapter_beats_base_and_answers_the_demo_rows(run_copy, qlora_main):
    proc = qlora_main("eval", str(run_copy), "--compare-base", "--split", "train", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    run, base = results["metrics"], results["base"]["metrics"]
    assert results["rows"] == 360  # every training row once (configs/tiny.yaml holds 40 of 400 out)
    assert run["loss"] < base["loss"] / 4, (run["loss"], base["loss"])
    assert run["exact_match"] >= 0.80, run["exact_match"]
    assert run["stopped"] == 1.0  # every answer ended at EOS, within the budget
    assert run["rouge_l"] > base["rouge_l"] + 0.5
    assert run["perplexity"] == pytest.approx(2.718281828 ** run["loss"])
    assert results["delta"]["loss"] == pytest.approx(run["loss"] - base["loss"])
    assert run["loss_samples_per_s"] > 0 and run["generate_samples_per_s"] > 0

    # The same numbers are kept in the run directory, with every answer beside its reference.
    saved = json.loads((run_copy / "eval_results.json").read_text())
    assert saved["metrics"] == run and saved["base"]["metrics"] == base
    predictions = [json.loads(line) for line in (run_copy / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 360
    assert sum(p["exact_match"] for p in predictions) / 360 == pytest.approx(run["exact_match"])
    assert all(p["prompt"].endswith("### Response:\n") for p in predictions)  # alpaca, as trained


def test_table_output_on_the_validation_split(run_copy, qlora_main):
    proc = qlora_main("eval", str(run_copy), "--max-samples", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for label in ("loss (response tokens)", "perplexity", "token accuracy", "exact match", "ROUGE-L F1", "samples/s"):
        assert label in proc.stdout, proc.stdout
    assert "validation split" in proc.stdout and "(8 rows)" in proc.stdout


def test_loss_equals_transformers_own_loss_row_by_row(tiny_run):
    """Token-weighted mean of the model's own per-row loss (labels=, shifted inside transformers);
    batching with padding must not change it."""
    from qlora_cli.infer.evaluate import eval_rows, score_tokens
    from qlora_cli.infer.target import load_target

    target = load_target(str(tiny_run))
    rows = eval_rows(target, split="validation").rows
    assert len(rows) == 40
    nll = count = 0
    with torch.no_grad():
        for r in rows:
            labels = torch.tensor([r["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            loss = target.model(input_ids=torch.tensor([r["input_ids"]]), labels=labels).loss.item()
            nll, count = nll + loss * n, count + n
    for batch_size in (1, 7, 40):
        ours = score_tokens(target, rows, batch_size)
        assert ours["response_tokens"] == count
        assert ours["loss"] == pytest.approx(nll / count, rel=1e-5), batch_size
    # Response tokens only, even for a run that trained on its inputs: the prompt is never scored.
    data = target.recipe.data.model_copy(update={"train_on_inputs": True})
    target.recipe = target.recipe.model_copy(update={"data": data})
    assert [r["labels"] for r in eval_rows(target, split="validation").rows] == [r["labels"] for r in rows]
    assert count < sum(len(r["input_ids"]) for r in rows) / 3


def test_batched_generation_equals_one_prompt_at_a_time(tiny_run):
    from qlora_cli.infer.evaluate import eval_rows, score_generations
    from qlora_cli.infer.target import load_target

    target = load_target(str(tiny_run))
    rows = eval_rows(target, split="validation", max_samples=12).rows
    batched, p_batched = score_generations(target, rows, batch_size=12, max_new_tokens=24)
    single, p_single = score_generations(target, rows, batch_size=1, max_new_tokens=24)
    assert [p["completion"] for p in p_batched] == [p["completion"] for p in p_single]
    assert batched["exact_match"] == single["exact_match"]


def test_last_reply_prompt_is_what_generate_would_send(tiny):
    """For multi-turn data, eval generates the last assistant turn from the training tokenization of
    everything before it, which must equal the ids `qlora generate` renders for that conversation."""
    from qlora_cli.recipe.schema import DataSection, DataSource
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.data.templates import apply_template, resolve_template
    from qlora_cli.infer.evaluate import last_reply
    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.infer.target import Target, _ModelRef

    tok = load_tokenizer(_ModelRef(str(tiny / "model")))
    template = resolve_template("chatml", tok)
    apply_template(template, tok)
    data = DataSection(sources=[DataSource(path=str(tiny / "chat.jsonl"), format="messages")], template="chatml",
                       val_size=0, cache=False)
    ds = build_datasets(data, tok, template, seed=0).train
    raw = [json.loads(line) for line in (tiny / "chat.jsonl").read_text().splitlines()]
    target = Target("run", "x", None, tok, template, None)
    multi_turn = 0
    for r in ds.select(range(20)):
        messages = raw[r["row"] - 1]["messages"]  # "row" is the 1-based line number
        prompt, reference = last_reply(r)
        assert tok.decode(reference, skip_special_tokens=True).strip() == messages[-1]["content"]
        assert prompt == target.prompt_ids(messages[:-1])
        multi_turn += sum(m["role"] == "assistant" for m in messages) > 1
    assert multi_turn > 0  # the check covered conversations with earlier replies in the prompt


def test_other_data_without_generation(run_copy, tiny, tmp_path, qlora_main):
    (run_copy / "eval_predictions.jsonl").write_text("stale\n")
    rows = [json.loads(line) for line in (tiny / "alpaca.jsonl").read_text().splitlines()][:6]
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = qlora_main("eval", str(run_copy), "--data", str(data), "--no-generate", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert results["rows"] == 6 and str(data) in results["data"]
    assert "exact_match" not in results["metrics"] and results["metrics"]["loss"] > 0
    assert not (run_copy / "eval_predictions.jsonl").exists()  # no answers that belong to another eval


def test_merged_model_scores_like_the_run(tiny_run, tmp_path, qlora_main):
    merged = tmp_path / "merged"
    assert qlora_main("merge", str(tiny_run), "--output", str(merged), "--no-verify").returncode == 0
    a = qlora_main("eval", str(merged), "--max-samples", "16", "--compare-base", "--json")
    assert a.returncode == 0, a.stderr[-2000:]
    merged_results = json.loads(a.stdout)
    assert merged_results["kind"] == "merged" and merged_results["base"]["label"] == "base (original weights)"
    from qlora_cli.infer.evaluate import eval_rows, score_tokens
    from qlora_cli.infer.target import load_target

    target = load_target(str(tiny_run))
    run_loss = score_tokens(target, eval_rows(target, max_samples=16).rows, 8)["loss"]
    assert merged_results["metrics"]["loss"] == pytest.approx(run_loss, abs=1e-4)
    assert merged_results["base"]["metrics"]["loss"] > 4 * run_loss


def test_base_model_on_plain_text(tiny, tmp_path, qlora_main):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"the river and the table number {i}"}) + "\n" for i in range(5)))
    proc = qlora_main("eval", str(tiny / "model"), "--data", str(text), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert results["kind"] == "base" and results["rows"] == 5
    assert "exact_match" not in results["metrics"]  # text has no replies to generate
    assert not (tiny / "model" / "eval_results.json").exists()  # a base model's directory is not ours


# --- Bad input -----------------------------------------------------------------------------------


def test_bad_targets_and_flags(tiny, tiny_run, tmp_path, qlora_main):
    _user_error(qlora_main("eval", str(tmp_path / "nowhere")), "holds no model and no adapter")
    _user_error(qlora_main("eval", str(tiny_run), "--split", "test"), "--split", "validation, train")
    _user_error(qlora_main("eval", str(tiny / "model")), "--data")
    _user_error(qlora_main("eval", str(tiny / "model"), "--data", str(tiny / "alpaca.jsonl")), "no chat template")
    _user_error(qlora_main("eval", str(tiny / "model"), "--compare-base", "--data", str(tiny / "alpaca.jsonl")),
                "--compare-base", "base model already")


def test_bad_data_files(run_copy, tmp_path, qlora_main):
    _user_error(qlora_main("eval", str(run_copy), "--data", str(tmp_path / "missing.jsonl")), "--data", "not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
    _user_error(qlora_main("eval", str(run_copy), "--data", str(bad)), "bad.jsonl", "line 2")
    assert not (run_copy / "eval_results.json").exists()


def test_no_validation_rows(run_copy, qlora_main):
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["data"]["val_size"] = 0
    recipe["train"]["eval_steps"] = None
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _user_error(qlora_main("eval", str(run_copy)), "--split", "no validation rows", "--split train")
