"""A new user's first day with runs that end and continue (issue 24, items 1, 2 and 7): resuming a
finished run trains nothing and says so, a resume past the end is refused naming the key, a
resumed run reports its whole training time and each segment's, and checkpoints/ holds no
generic card."""

from __future__ import annotations

import json

import pytest

from conftest import recipe_file

CHANGES = {"train": {"max_steps": 4, "save_steps": 2, "eval_steps": 4, "logging_steps": 2}}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A run trained to its last step (4), with checkpoints at 2 and 4."""
    from conftest import run_cli

    work = tmp_path_factory.mktemp("finished")
    recipe = recipe_file(tiny, work, CHANGES)
    proc = run_cli("train", str(recipe), "--output-dir", str(work / "run"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return recipe, work / "run"


def _snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name != ".qlora-run.lock"}


@pytest.mark.slow  # finished: a training run in a fresh interpreter
def test_checkpoints_hold_no_generic_trl_card(finished):
    _, run_dir = finished
    assert (run_dir / "README.md").is_file()  # the run's own card
    assert not (run_dir / "checkpoints" / "README.md").exists()
    assert not list((run_dir / "checkpoints").rglob("README.md"))


@pytest.mark.slow  # finished: a training run in a fresh interpreter
def test_resuming_a_finished_run_trains_nothing_and_says_so(finished, qlora_main):
    recipe, run_dir = finished
    before = _snapshot(run_dir)
    done = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "already complete at step 4 of 4" in done.stderr and "nothing to train" in done.stderr
    assert "--set train.max_steps=8" in done.stderr
    assert _snapshot(run_dir) == before  # no checkpoint-5, no rewritten summary or card


@pytest.mark.slow  # finished: a training run in a fresh interpreter
def test_resuming_below_the_reached_step_is_refused(finished, qlora_main):
    recipe, run_dir = finished
    before = _snapshot(run_dir)
    refused = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume", "--set", "train.max_steps=1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "train.max_steps" in refused.stderr and "checkpoint-4 is already at step 4" in refused.stderr
    assert _snapshot(run_dir) == before


@pytest.mark.slow  # finished: a training run in a fresh interpreter
def test_a_resumed_run_reports_its_whole_time_and_each_segment(finished, tmp_path, qlora_main):
    import shutil

    recipe, original = finished
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    first = json.loads((run_dir / "summary.json").read_text())
    assert "segments" not in first  # one stretch: nothing to split

    more = qlora_main("train", str(recipe), "--output-dir", str(run_dir), "--resume", "--set", "train.max_steps=6")
    assert more.returncode == 0, more.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6
    segments = summary["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 4), (4, 6)]
    assert all(s["seconds"] > 0 for s in segments)
    assert summary["runtime_s"] == pytest.approx(sum(s["seconds"] for s in segments), abs=0.02)
    # The first segment's time is what the first run logged (its last elapsed_s, at step 4).
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    mark = next(r for r in records if r.get("resumed"))
    assert mark["step"] == 4 and segments[0]["seconds"] == pytest.approx(mark["elapsed_s"], abs=0.01)
    # elapsed_s keeps counting across the resume instead of restarting.
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[-1] > mark["elapsed_s"]
    panel = " ".join(more.stderr.replace("│", " ").split())
    assert "6 steps in" in panel and "(2 segments:" in panel and "to step 4" in panel and "from step 4" in panel
    card = (run_dir / "README.md").read_text()
    assert "2 segments:" in card


@pytest.mark.slow  # finished: a training run in a fresh interpreter
def test_what_was_not_trained_is_in_the_end_panel_and_the_card(finished):
    from rich.console import Console

    from qlora_cli.outputs.model_card import render_model_card
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.train.end_panel import render_summary_panel

    recipe_path, run_dir = finished
    recipe = load_recipe(recipe_path)
    summary = json.loads((run_dir / "summary.json").read_text())

    def shown(summary):
        console = Console(width=100, record=True, file=open("/dev/null", "w"))
        console.print(render_summary_panel(summary, recipe, str(run_dir)))
        panel = " ".join(console.export_text().replace("│", " ").split())
        return panel, render_model_card(recipe, summary, str(run_dir))

    panel, card = shown(summary)  # the demo data fits: nothing to report
    assert "not trained" not in panel and "every example was trained whole" in card

    data = summary["data"]
    data["sources"][0]["kept"] -= 35
    data.update(truncated=209, dropped_too_long=35, bad_rows=2,
                bad_row_examples=["alpaca.jsonl line 3: the response is empty"])
    panel, card = shown(summary)
    kept = sum(s["kept"] for s in data["sources"] + data["val_sources"])
    for text in (panel, card):
        assert f"209 of {kept + 35:,} examples cut to max_seq_len={recipe.data.max_seq_len}" in text
        assert "raise data.max_seq_len" in text and "data.on_too_long: drop" in text
        assert "35 dropped as longer than max_seq_len" in text
        assert "2 bad rows skipped (alpaca.jsonl line 3: the response is empty" in text
    assert "not trained" in panel


@pytest.mark.slow  # finished: a training run in a fresh interpreter
def test_what_was_used_is_shown_the_merge_names_its_output_and_eval_losses_are_labelled(finished, tmp_path, qlora_main):
    import yaml

    recipe_path, run_dir = finished
    saved = (run_dir / "recipe.yaml").read_text()
    assert "  template: null  # the format's default: alpaca\n" in saved
    assert yaml.safe_load(saved)["data"]["template"] is None  # still the recipe as written: resume compares it
    shown = qlora_main("validate", str(recipe_path))
    assert shown.returncode == 0 and "template: null  # the format's default: alpaca" in shown.stdout
    assert "the trainer's mean over validation batches" in (run_dir / "README.md").read_text()

    out = tmp_path / "merged"
    merged = qlora_main("merge", str(run_dir), "--output", str(out))
    assert merged.returncode == 0, merged.stderr[-2000:]
    said = " ".join(merged.stderr.split())
    assert f"into {out} (" in said and "with the base" in said


@pytest.mark.parametrize("without", ["switched off", "unreachable"])
def test_a_hub_dataset_without_the_hub_fails_at_once_with_one_message(without, write_recipe, qlora_main, monkeypatch):
    import datasets

    recipe = write_recipe({"data": {"sources": [{"path": "someone/not-cached-data", "format": "alpaca"}]}})
    env = {}
    if without == "switched off":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("qlora_cli.util.hub.hub_reachable", lambda timeout=5.0: False)
    offline_before = datasets.config.HF_HUB_OFFLINE
    refused = qlora_main("validate", str(recipe), env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    said = " ".join(refused.stderr.split())
    assert "data.sources[0].path" in said and "'someone/not-cached-data' is not in the local cache" in said
    assert without in said and "point the source at a local file" in said
    assert "Retrying" not in refused.stderr  # datasets' retries against a hub that is not there
    assert datasets.config.HF_HUB_OFFLINE == offline_before  # the cache-only switch is put back
