"""`qlora data`: rendered examples with trained tokens marked, and statistics, for a known fixture."""

from __future__ import annotations

import json

import pytest
import yaml

from qlora_cli.data.formats import ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT

FIXTURE = [
    {"instruction": "What is the opposite of hot?", "input": "", "output": "cold"},
    {"instruction": "Reverse the order of these words.", "input": "apple river", "output": "river apple"},
]
EXPECTED = {  # row -> (masked prompt, trained response): the exact text the model is fed
    1: (f"<s>{ALPACA_SYSTEM_NO_INPUT}\n\n### Instruction:\nWhat is the opposite of hot?\n\n### Response:\n",
        "cold</s>"),
    2: (f"<s>{ALPACA_SYSTEM_WITH_INPUT}\n\n### Instruction:\nReverse the order of these words.\n\n### Input:\n"
        "apple river\n\n### Response:\n", "river apple</s>"),
}


@pytest.fixture()
def recipe(write_recipe, tmp_path):
    data = tmp_path / "fixture.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FIXTURE) + '{"instruction": "broken"\n')
    return write_recipe({
        "data": {"sources": [{"path": str(data), "format": "alpaca"}], "val_size": 0},
        "train": {"eval_steps": None, "batch_size": 2},
    })


def test_json_output_gives_the_exact_rendering_and_mask(recipe, qlora_main):
    proc = qlora_main("data", str(recipe), "--n", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["template"] == "alpaca"
    by_row = {ex["row"]: ex for ex in out["examples"]}
    assert set(by_row) == {1, 2}  # the broken line 3 is skipped, not shown
    for row, (prompt, response) in EXPECTED.items():
        ex = by_row[row]
        assert [(s["text"], s["trained"]) for s in ex["segments"]] == [(prompt, False), (response, True)]
        assert ex["file"].endswith("fixture.jsonl") and not ex["truncated"]
    stats = out["stats"]
    assert stats["sources"][0]["rows"] == 3 and stats["bad_rows"] == 1 and stats["train_rows"] == 2
    assert stats["bad_row_examples"][0].endswith("line 3: malformed JSON: Expecting ',' delimiter at character 25")
    assert stats["batching"]["batch_size"] == 2
    assert "skipped 1 bad row(s)" in proc.stderr  # the warning still reaches the user


def test_human_output_highlights_trained_tokens_and_dims_the_rest(recipe, qlora_main):
    proc = qlora_main("data", str(recipe), "--n", "2", env={"FORCE_COLOR": "1", "TERM": "xterm"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "trained tokens" in out and "masked tokens" in out  # the legend
    for prompt, response in EXPECTED.values():
        # masked prompt in dim (SGR 2), response + EOS in bold green (SGR 1;32)
        assert f"\x1b[2m{prompt.splitlines()[0]}" in out
        assert f"\x1b[1;32m{response}\x1b[0m" in out
    assert "fixture.jsonl line 1" in out and "fixture.jsonl line 2" in out


def test_stats_show_sources_lengths_histogram_and_efficiency(recipe, qlora_main):
    proc = qlora_main("data", str(recipe), "--n", "0", "--stats")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for expected in ("fixture.jsonl", "length histogram", "padding efficiency", "with packing",
                     "batches per epoch", "tokens per epoch", "median"):
        assert expected in out


def test_unmapped_tool_roles_stop_the_preview_with_exit_2(write_recipe, tmp_path, qlora_main):
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"},
        {"from": "observation", "value": "{}"}, {"from": "gpt", "value": "ok"}]}) + "\n")
    recipe = write_recipe({"data": {"sources": [{"path": str(data), "format": "sharegpt"}], "template": "chatml",
                                    "val_size": 0}, "train": {"eval_steps": None}})
    proc = qlora_main("data", str(recipe))
    assert proc.returncode == 2
    assert "'function_call' (1 rows)" in proc.stderr and "'observation' (1 rows)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recipe_errors_are_reported_before_any_data_work(write_recipe, qlora_main):
    recipe = write_recipe({"data": {"sources": [{"path": "x.jsonl", "format": "alpaca"}], "packin": True}})
    proc = qlora_main("data", str(recipe))
    assert proc.returncode == 2 and "data.packin" in proc.stderr and "did you mean 'packing'" in proc.stderr
    assert yaml.safe_load(recipe.read_text())  # untouched
