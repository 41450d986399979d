"""Preprocessing in memory bounded by the rows (issue 27): the cache stores the tokenized files as the
map wrote them and the train/validation orders, never the rows themselves; a hit assembles exactly
the datasets the build returned."""

from __future__ import annotations

import json
import os

import pytest

from qlora_cli.data import cache
from qlora_cli.data.pipeline import build_datasets
from qlora_cli.data.templates import apply_template, resolve_template
from qlora_cli.model.load import load_tokenizer
from qlora_cli.recipe.schema import DataSection, ModelSection

COLUMNS = ["input_ids", "labels", "row", "length", "trained", "source", "file"]


# Every test here gets a cache directory of its own (conftest.py's cache_dir).
pytestmark = pytest.mark.usefixtures("cache_dir")


@pytest.fixture()
def tok(tiny):
    t = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    template = resolve_template("alpaca", t)
    apply_template(template, t)
    return t, template


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _files(tmp_path, broken=True):
    rows = [{"instruction": f"Say apple {i}.", "input": "x" if i % 3 else "", "output": f"apple {i}"} for i in range(30)]
    # Rows the policies drop: bad rows (broken JSON, which makes the whole file read row by row, and
    # an empty answer), a row too long for max_seq_len.
    first = rows[:10] + (['{"instruction": "broken"'] if broken else [])
    first += [{"instruction": "long " * 200, "input": "", "output": "a"}]
    first += [{"instruction": "no answer", "input": "", "output": ""}] + rows[10:20]
    return _jsonl(tmp_path / "a.jsonl", first), _jsonl(tmp_path / "b.jsonl", rows[20:]), _jsonl(
        tmp_path / "v.jsonl", rows[:7]
    )


def _data(tmp_path, broken=True, **settings):
    a, b, v = _files(tmp_path, broken)
    sources = [{"path": a, "format": "alpaca"}, {"path": b, "format": "alpaca", "weight": 2.5}]
    settings.setdefault("val_size", 3)
    return DataSection(sources=sources, max_seq_len=96, on_bad_row="skip", on_too_long="drop", **settings)


def _rows(ds):
    return [tuple(json.dumps(r[c]) for c in COLUMNS) for r in ds]


@pytest.mark.parametrize("val", ["val_size", "val_sources"])
def test_a_hit_is_the_build_row_for_row_with_dropped_rows_repeats_and_two_sources(tiny, tok, tmp_path, val):
    settings = {}
    if val == "val_sources":
        settings = {"val_size": 0, "val_sources": [{"path": _files(tmp_path)[2], "format": "alpaca"}]}
    data = _data(tmp_path, **settings)
    built = build_datasets(data, *tok, seed=3)
    hit = build_datasets(data, *tok, seed=3)
    assert (built.stats.cache, hit.stats.cache) == ("miss", "hit")
    assert built.train.column_names == hit.train.column_names == COLUMNS
    assert _rows(hit.train) == _rows(built.train) and _rows(hit.val) == _rows(built.val)
    assert hit.val.column_names == COLUMNS
    # the policies did drop rows, and the weight repeated some: the orders are not the files' order
    assert (built.stats.bad_rows, built.stats.dropped_too_long) == (2, 1)
    assert len(built.train) > 20 and len(set(_rows(built.train))) < len(built.train)
    uncached = build_datasets(data, *tok, seed=3, use_cache=False)
    assert _rows(uncached.train) == _rows(built.train) and _rows(uncached.val) == _rows(built.val)
    a, b = built.stats.to_dict(), hit.stats.to_dict()
    a.pop("cache"), b.pop("cache")
    assert a == b


def test_storing_the_cache_reads_no_row(tiny, tok, tmp_path, cache_dir, monkeypatch):
    """Writing the shuffled rows (save_to_disk) read every token id through the memory map, all of it
    then counted in the process's RSS: the entry links the map's own files instead."""
    from datasets import Dataset

    def refuse(*args, **kwargs):
        raise AssertionError("the cache wrote a copy of the rows")

    monkeypatch.setattr(Dataset, "save_to_disk", refuse)
    monkeypatch.setattr(Dataset, "flatten_indices", refuse)
    data = _data(tmp_path, broken=False)  # every file read by `datasets`, memory-mapped
    built = build_datasets(data, *tok, seed=0)
    assert built.stats.cache == "miss"
    shards = sorted((cache_dir / built.stats.cache_key / "parts").rglob("*.arrow"))
    assert len(shards) == 2  # one per file, one process each (few rows)
    assert all(os.stat(s).st_nlink >= 2 for s in shards)  # the map's own files, linked
    assert _rows(build_datasets(data, *tok, seed=0).train) == _rows(built.train)


def test_an_entry_of_the_previous_format_is_not_read(tiny, tok, tmp_path, monkeypatch):
    data = _data(tmp_path)
    monkeypatch.setattr(cache, "FORMAT_VERSION", 5)
    assert build_datasets(data, *tok, seed=0).stats.cache == "miss"
    monkeypatch.setattr(cache, "FORMAT_VERSION", 6)
    assert build_datasets(data, *tok, seed=0).stats.cache == "miss"
