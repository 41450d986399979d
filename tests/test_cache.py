"""The tokenized-data cache: reused when nothing changed, rebuilt when any part of its key changes."""

from __future__ import annotations

import json
import shutil

import pytest

from qlora_cli.recipe.schema import DataSection, ModelSection
from qlora_cli.data import cache
from qlora_cli.data.pipeline import build_datasets
from qlora_cli.data.templates import apply_template, resolve_template
from qlora_cli.model.load import load_tokenizer

ROWS = [{"instruction": f"Say apple {i}.", "input": "x" if i % 2 else "", "output": f"apple {i}"} for i in range(12)]


# Every test here gets a cache directory of its own (conftest.py's cache_dir).
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def tokenizer(tiny, template="alpaca", extra_token=None):
    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    if extra_token:
        tok.add_tokens([extra_token])
    t = resolve_template(template, tok)
    apply_template(t, tok)
    return tok, t


def run(tiny, data_file, seed=0, template="alpaca", extra_token=None, **settings):
    tok, t = tokenizer(tiny, template, extra_token)
    data = DataSection(sources=[{"path": str(data_file), "format": "alpaca"}], val_size=2, **settings)
    return build_datasets(data, tok, t, seed=seed)


def rows(ds) -> list:
    return [(r["input_ids"], r["labels"]) for r in ds]


def test_a_second_run_is_a_cache_hit_with_identical_data(tiny, data_file, cache_dir):
    first = run(tiny, data_file)
    second = run(tiny, data_file)
    assert (first.stats.cache, second.stats.cache) == ("miss", "hit")
    assert rows(second.train) == rows(first.train) and rows(second.val) == rows(first.val)
    assert second.stats.train_rows == first.stats.train_rows == 10
    assert second.stats.batching == first.stats.batching
    assert [p.name for p in cache_dir.iterdir()] == [first.stats.cache_key]  # no temporary leftovers


def test_cache_can_be_switched_off(tiny, data_file, cache_dir):
    assert run(tiny, data_file, cache=False).stats.cache == "off"
    assert not cache_dir.exists()


# Each change below alters what the pipeline would produce, so it must miss the cache.
SETTING_CHANGES = {
    "max_seq_len": {"max_seq_len": 100},
    "train_on_inputs": {"train_on_inputs": True},
    "on_too_long": {"on_too_long": "drop"},
    "on_bad_row": {"on_bad_row": "error"},
    "val_size": {"val_size": 3},
    "weight": {"sources": "weight"},
    "columns": {"sources": "columns"},
}


@pytest.mark.parametrize("setting", list(SETTING_CHANGES))
def test_every_data_setting_is_in_the_key(tiny, data_file, setting):
    base = run(tiny, data_file)
    change = dict(SETTING_CHANGES[setting])
    tok, t = tokenizer(tiny)
    source = {"path": str(data_file), "format": "alpaca"}
    if change.get("sources") == "weight":
        source["weight"] = 2
    if change.get("sources") == "columns":
        source["columns"] = {"input": "input"}  # same data, different setting: still a different key
    change.pop("sources", None)
    change.setdefault("val_size", 2)
    changed = build_datasets(DataSection(sources=[source], **change), tok, t, seed=0)
    assert changed.stats.cache == "miss" and changed.stats.cache_key != base.stats.cache_key


def test_changed_file_content_misses_even_at_the_same_path(tiny, data_file):
    base = run(tiny, data_file)
    edited = [dict(r) for r in ROWS]
    edited[5]["output"] = "river 5"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in edited))
    after = run(tiny, data_file)
    assert after.stats.cache == "miss"
    texts = [row["input_ids"] for row in (*after.train, *after.val)]
    assert any("river 5" in tokenizer(tiny)[0].decode(ids) for ids in texts)
    assert rows(after.train) + rows(after.val) != rows(base.train) + rows(base.val)


def test_a_changed_template_misses(tiny, data_file, tmp_path):
    run(tiny, data_file)
    assert run(tiny, data_file, template="chatml").stats.cache == "miss"
    # a custom template edited in place: same path, new text
    custom = tmp_path / "t.jinja"
    custom.write_text(resolve_template("alpaca", tokenizer(tiny)[0]).jinja)
    assert run(tiny, data_file, template=str(custom)).stats.cache == "miss"
    assert run(tiny, data_file, template=str(custom)).stats.cache == "hit"
    custom.write_text(custom.read_text().replace("### Response:", "### Answer:"))
    assert run(tiny, data_file, template=str(custom)).stats.cache == "miss"


def test_a_changed_tokenizer_misses(tiny, data_file):
    run(tiny, data_file)
    assert run(tiny, data_file, extra_token="<|new|>").stats.cache == "miss"


def test_the_seed_is_in_the_key(tiny, data_file):
    a = run(tiny, data_file, seed=0)
    b = run(tiny, data_file, seed=1)
    assert b.stats.cache == "miss" and rows(a.val) != rows(b.val)


@pytest.mark.parametrize("setting", [{"packing": True}, {"num_proc": 2}])
def test_settings_that_do_not_change_the_rows_still_hit(tiny, data_file, setting):
    run(tiny, data_file)
    assert run(tiny, data_file, **setting).stats.cache == "hit"


def test_an_incomplete_entry_is_rebuilt_not_trusted(tiny, data_file, cache_dir):
    first = run(tiny, data_file)
    entry = cache_dir / first.stats.cache_key
    shutil.rmtree(entry / "train")  # e.g. a disk filled up, or someone cleaned half of it
    again = run(tiny, data_file)
    assert again.stats.cache == "miss" and rows(again.train) == rows(first.train)
    assert run(tiny, data_file).stats.cache == "hit"


def test_key_changes_with_the_pipeline_version(tiny, data_file, monkeypatch):
    base = run(tiny, data_file)
    monkeypatch.setattr(cache, "FORMAT_VERSION", cache.FORMAT_VERSION + 1)
    assert run(tiny, data_file).stats.cache_key != base.stats.cache_key


def test_a_hit_with_another_batch_size_recomputes_the_padding_figures(tiny, data_file):
    tok, t = tokenizer(tiny)
    data = DataSection(sources=[{"path": str(data_file), "format": "alpaca"}], val_size=2)
    first = build_datasets(data, tok, t, seed=0, batch_size=2)
    hit = build_datasets(data, tok, t, seed=0, batch_size=8)
    assert hit.stats.cache == "hit" and hit.stats.batching["batch_size"] == 8
    assert hit.stats.batching["batches_per_epoch"] == 2 and first.stats.batching["batches_per_epoch"] == 5


def test_a_hit_asked_for_packing_figures_works_them_out(tiny, data_file):
    """An entry stored by a run that does not pack has no packing figures; `qlora data` (or a run
    that packs) reading it gets them, the same as a cold build that asked for them."""
    tok, t = tokenizer(tiny)
    data = DataSection(sources=[{"path": str(data_file), "format": "alpaca"}], val_size=2)
    first = build_datasets(data, tok, t, seed=0)
    assert first.stats.cache == "miss" and "packed_rows" not in first.stats.batching
    hit = build_datasets(data, tok, t, seed=0, packing_figures=True)
    cold = build_datasets(data, tok, t, seed=0, use_cache=False, packing_figures=True)
    assert hit.stats.cache == "hit" and hit.stats.batching == cold.stats.batching
    assert hit.stats.batching["packed_rows"] > 0
    packs = build_datasets(data.model_copy(update={"packing": True}), tok, t, seed=0)
    assert packs.stats.cache == "hit" and packs.stats.batching == cold.stats.batching
