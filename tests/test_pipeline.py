"""The data pipeline: file types, column mapping, validation split, bad rows."""

from __future__ import annotations

import json

import pytest

from qlora_cli.config import DataSection, ModelSection
from qlora_cli.data.pipeline import IGNORE_INDEX, build_datasets
from qlora_cli.data.templates import apply_template, resolve_template
from qlora_cli.errors import UserError
from qlora_cli.modeling import load_tokenizer

ROWS = [
    {"instruction": "Count from 1 to 3.", "input": "", "output": "1 2 3"},
    {"instruction": "Repeat the word 2 times.", "input": "apple", "output": "apple apple"},
    {"instruction": "What is the opposite of up?", "input": "", "output": "down"},
    {"instruction": "Reverse the order of these words.", "input": "stone river", "output": "river stone"},
]


@pytest.fixture()
def tok(tiny):
    t = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    apply_template(resolve_template("alpaca", t), t)
    return t


def _write(path, rows):
    import pandas as pd

    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


def col(ds, name="input_ids") -> list:
    """A column as plain lists (datasets 5 returns a lazy Column object)."""
    return [row[name] for row in ds]


def _data(path, fmt="alpaca", **kw):
    source = {"path": str(path), "format": fmt, **kw.pop("source", {})}
    return DataSection(sources=[source], **kw)


def test_every_file_type_gives_the_same_tokens(tok, tmp_path):
    results = {}
    for suffix in (".json", ".jsonl", ".csv", ".parquet"):
        train, _, stats = build_datasets(_data(_write(tmp_path / f"d{suffix}", ROWS)), tok, seed=0)
        results[suffix] = (col(train), col(train, "labels"))
        assert stats.train_rows == 4
    assert len({json.dumps(r) for r in results.values()}) == 1


def test_column_mapping_reads_custom_field_names(tok, tmp_path):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ROWS]
    path = _write(tmp_path / "custom.jsonl", renamed)
    mapped = _data(path, source={"columns": {"instruction": "question", "input": "context", "output": "answer"}})
    train, _, _ = build_datasets(mapped, tok, seed=0)
    reference, _, _ = build_datasets(_data(_write(tmp_path / "ref.jsonl", ROWS)), tok, seed=0)
    assert col(train) == col(reference) and len(col(train)) == 4


def test_optional_input_column_may_be_absent(tok, tmp_path):
    rows = [{"instruction": r["instruction"], "output": r["output"]} for r in ROWS]
    train, _, _ = build_datasets(_data(_write(tmp_path / "noinput.jsonl", rows)), tok, seed=0)
    assert len(train) == 4


@pytest.mark.parametrize("val_size, n_val", [(0.25, 1), (2, 2)])
def test_validation_split_by_fraction_or_count_is_seeded(tok, tmp_path, val_size, n_val):
    path = _write(tmp_path / "d.jsonl", ROWS)
    train, val, stats = build_datasets(_data(path, val_size=val_size), tok, seed=3)
    assert (len(train), len(val)) == (4 - n_val, n_val) and stats.val_rows == n_val
    again, val_again, _ = build_datasets(_data(path, val_size=val_size), tok, seed=3)
    assert col(val) == col(val_again) and col(train) == col(again)
    assert not set(map(tuple, col(train))) & set(map(tuple, col(val)))


def test_validation_larger_than_data_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError) as err:
        build_datasets(_data(_write(tmp_path / "d.jsonl", ROWS), val_size=4), tok, seed=0)
    assert err.value.problems[0].where == "data.val_size"


def test_bad_rows_are_reported_with_row_numbers(tok, tmp_path):
    rows = ROWS + [{"instruction": "x", "input": "", "output": ""}, {"instruction": 5, "input": "", "output": "y"}]
    path = _write(tmp_path / "bad.json", rows)
    with pytest.raises(UserError) as err:
        build_datasets(_data(path), tok, seed=0)
    found = [(p.where, p.message) for p in err.value.problems]
    assert found[0] == (f"{path}: row 5", "field 'output' is missing or empty")
    assert found[1][0] == f"{path}: row 6"


def test_messages_with_unknown_role_are_rejected_not_dropped(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "function_call", "content": "{}"},
                          {"role": "assistant", "content": "ok"}]}]
    with pytest.raises(UserError) as err:
        build_datasets(_data(_write(tmp_path / "m.jsonl", rows), fmt="messages", template="alpaca"), tok, seed=0)
    assert "unknown role 'function_call'" in err.value.problems[0].message


def test_malformed_json_names_the_file(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(UserError) as err:
        build_datasets(_data(path), tok, seed=0)
    assert err.value.problems[0].where == "data.sources[0].path" and str(path) in err.value.problems[0].message


def test_stats_count_trained_tokens_and_long_rows(tok, tmp_path):
    rows = ROWS + [{"instruction": "Count.", "input": "", "output": " ".join(["1"] * 200)}]
    train, _, stats = build_datasets(_data(_write(tmp_path / "d.jsonl", rows), max_seq_len=128), tok, seed=0)
    assert max(len(ids) for ids in col(train)[:4]) < 128 < len(col(train)[4])
    assert stats.over_max_len == 1
    assert stats.trained_tokens == sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in col(train, "labels"))
    assert stats.train_tokens == sum(len(ids) for ids in col(train))


def test_rows_whose_response_is_cut_off_are_left_out_and_counted(tok, tmp_path):
    long_prompt = {"instruction": "Count. " * 60, "input": "", "output": "1 2"}
    path = _write(tmp_path / "d.jsonl", ROWS + [long_prompt])
    train, _, stats = build_datasets(_data(path, max_seq_len=100), tok, seed=0)
    assert stats.dropped_no_response == 1 and stats.train_rows == 4 == len(train)
    assert all(any(t != IGNORE_INDEX for t in lab[:100]) for lab in col(train, "labels"))


def test_nothing_left_to_train_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError) as err:
        build_datasets(_data(_write(tmp_path / "d.jsonl", ROWS), max_seq_len=8), tok, seed=0)
    assert err.value.problems[0].where == "data.max_seq_len"
