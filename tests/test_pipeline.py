"""The data pipeline: sources, formats, mixing, validation sets, policies, statistics."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from qlora_cli.recipe.schema import DataSection, ModelSection
from qlora_cli.data.pipeline import IGNORE_INDEX, _column, batching_efficiency, build_datasets
from qlora_cli.data.templates import apply_template, resolve_template
from qlora_cli.errors import UserError
from qlora_cli.model.load import load_tokenizer

ROWS = [
    {"instruction": "Count from 1 to 3.", "input": "", "output": "1 2 3"},
    {"instruction": "Repeat the word 2 times.", "input": "apple", "output": "apple apple"},
    {"instruction": "What is the opposite of up?", "input": "", "output": "down"},
    {"instruction": "Reverse the order of these words.", "input": "stone river", "output": "river stone"},
]


@pytest.fixture()
def tok(tiny):
    return tokenizer(tiny, "alpaca")


def tokenizer(tiny, template: str):
    t = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    apply_template(resolve_template(template, t), t)
    return t


def build(data: DataSection, tok, seed: int = 0, template: str | None = "alpaca", **kw):
    """build_datasets without the cache (tests/test_cache.py covers it)."""
    t = resolve_template(template, tok) if template else None
    return build_datasets(data, tok, t, seed=seed, use_cache=False, **kw)


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


# ---------------------------------------------------------------------------------------------
# Sources and formats


def test_every_file_type_gives_the_same_tokens(tok, tmp_path):
    results = {}
    for suffix in (".json", ".jsonl", ".csv", ".parquet"):
        p = build(_data(_write(tmp_path / f"d{suffix}", ROWS)), tok)
        results[suffix] = (sorted(col(p.train)), sorted(col(p.train, "labels")))
        assert p.stats.train_rows == 4
    assert len({json.dumps(r) for r in results.values()}) == 1


def test_numeric_csv_cells_are_read_as_text(tok, tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("instruction,input,output\nWhat is 2 + 3?,,5\nAnd 10 + 2?,,12\n")
    p = build(_data(path), tok)
    assert p.stats.bad_rows == 0 and p.stats.train_rows == 2
    assert {tok.decode([t for t in lab if t != IGNORE_INDEX]) for lab in col(p.train, "labels")} == {"5</s>", "12</s>"}


def test_txt_files_are_text_rows_and_blank_lines_are_not_examples(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("green water light\n\nbig table\n   \nstone river\n")
    p = build(_data(path, fmt="text"), tok, template=None)
    texts = sorted(tok.decode(ids, skip_special_tokens=True) for ids in col(p.train))
    assert texts == ["big table", "green water light", "stone river"]
    # text: every token trained, but the first (nothing precedes it: in a packed row, another example would)
    assert all(lab == [IGNORE_INDEX] + ids[1:] for ids, lab in zip(col(p.train), col(p.train, "labels")))
    whole = build(_data(path, fmt="text", source={"sample_by": "document"}), tok, template=None)
    assert whole.stats.train_rows == 1


def test_txt_needs_the_text_format(tok, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError) as err:
        build(_data(path), tok)
    assert err.value.problems[0].where == "data.sources[0].format"


def test_globs_and_directories_read_every_data_file_in_order(tok, tmp_path):
    shard_dir = tmp_path / "shards"
    (shard_dir / "nested").mkdir(parents=True)
    _write(shard_dir / "a.jsonl", ROWS[:2])
    _write(shard_dir / "nested" / "b.jsonl", ROWS[2:])
    (shard_dir / "README.md").write_text("not data")
    by_dir = build(_data(shard_dir), tok)
    by_glob = build(_data(str(shard_dir / "**" / "*.jsonl")), tok)
    single = build(_data(_write(tmp_path / "all.jsonl", ROWS)), tok)
    assert by_dir.stats.sources[0].files == [str(shard_dir / "a.jsonl"), str(shard_dir / "nested" / "b.jsonl")]
    assert by_glob.stats.sources[0].files == by_dir.stats.sources[0].files
    assert sorted(col(by_dir.train)) == sorted(col(by_glob.train)) == sorted(col(single.train))
    # each example remembers its file and line, for `qlora data` and error messages
    assert sorted((r["file"], r["row"]) for r in by_dir.train) == [(0, 1), (0, 2), (1, 1), (1, 2)]


@pytest.mark.parametrize("path, message", [("nothing/*.jsonl", "holds no data files"), ("missing.jsonl", "not found")])
def test_sources_that_name_no_data_are_user_errors(tok, tmp_path, path, message):
    with pytest.raises(UserError) as err:
        build(_data(tmp_path / path), tok)
    assert err.value.problems[0].where == "data.sources[0].path" and message in err.value.problems[0].message


def test_column_mapping_reads_custom_field_names(tok, tmp_path):
    renamed = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ROWS]
    path = _write(tmp_path / "custom.jsonl", renamed)
    mapped = _data(path, source={"columns": {"instruction": "question", "input": "context", "output": "answer"}})
    reference = build(_data(_write(tmp_path / "ref.jsonl", ROWS)), tok)
    assert col(build(mapped, tok).train) == col(reference.train) and len(reference.train) == 4


def test_optional_input_column_may_be_absent(tok, tmp_path):
    rows = [{"instruction": r["instruction"], "output": r["output"]} for r in ROWS]
    assert len(build(_data(_write(tmp_path / "noinput.jsonl", rows)), tok).train) == 4


SHAREGPT = [
    {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 degrees."},
    ], "tools": json.dumps([{"name": "weather", "parameters": {"type": "object"}}])},  # Glaive keeps JSON text
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "tools": ""},
]


def test_sharegpt_tool_roles_must_be_mapped_and_the_error_names_them(tiny, tmp_path):
    tok = tokenizer(tiny, "chatml")
    path = _write(tmp_path / "tools.json", SHAREGPT)
    with pytest.raises(UserError) as err:
        build(_data(path, fmt="sharegpt"), tok, template="chatml")
    problem = err.value.problems[0]
    assert problem.where == "data.sources[0].roles"
    assert "'function_call' (1 rows)" in problem.message and "'observation' (1 rows)" in problem.message
    assert "row 1" in problem.message

    mapped = _data(path, fmt="sharegpt", source={"roles": {"function_call": "assistant", "observation": "tool"}})
    p = build(mapped, tok, template="chatml")
    assert p.stats.train_rows == 2 and p.stats.bad_rows == 0
    text = next(tok.decode(ids) for ids in col(p.train) if len(ids) > 30)
    assert "<|im_start|>tool\n{\"temp\": 21}<|im_end|>" in text and '"city": "Paris"' in text
    assert text.startswith('<s><|im_start|>system\nYou can call these tools:\n{"name": "weather"')


def test_a_role_the_template_cannot_render_stops_the_run(tok, tmp_path):
    path = _write(tmp_path / "tools.json", SHAREGPT)
    mapped = _data(path, fmt="sharegpt", source={"roles": {"function_call": "assistant", "observation": "tool"}})
    with pytest.raises(UserError) as err:
        build(mapped, tok, template="alpaca")
    assert "no place for" in err.value.problems[0].message
    assert err.value.problems[0].where == f"{path}: row 1"


def test_an_unknown_non_tool_role_is_a_bad_row(tok, tmp_path):
    rows = [*ROWS[:0], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    p = build(_data(_write(tmp_path / "m.jsonl", rows), fmt="messages"), tok, template="chatml")
    assert p.stats.bad_rows == 1 and "unknown role 'usr'" in p.stats.bad_row_examples[0]
    assert "line 2" in p.stats.bad_row_examples[0]


# ---------------------------------------------------------------------------------------------
# Mixing and validation sets


def _many(tmp_path, name: str, n: int, word: str):
    rows = [{"instruction": f"Say {word} {i}.", "input": "", "output": f"{word} {i}"} for i in range(n)]
    return _write(tmp_path / name, rows)


def _origin(p, tok) -> Counter:
    return Counter(tok.decode(lab).split()[0] for lab in ([t for t in row if t != IGNORE_INDEX]
                                                          for row in col(p.train, "labels")))


def test_sources_are_mixed_by_weight_and_sample_count(tok, tmp_path):
    a, b, c = _many(tmp_path, "a.jsonl", 20, "apple"), _many(tmp_path, "b.jsonl", 10, "river"), _many(
        tmp_path, "c.jsonl", 8, "stone")
    data = DataSection(sources=[
        {"path": str(a), "format": "alpaca", "weight": 0.5},
        {"path": str(b), "format": "alpaca", "weight": 2},
        {"path": str(c), "format": "alpaca", "samples": 12},
    ])
    p = build(data, tok, seed=1)
    assert _origin(p, tok) == {"apple": 10, "river": 20, "stone": 12}
    assert [s.used for s in p.stats.sources] == [10, 20, 12]
    rows = Counter(tuple(ids) for ids in col(p.train))
    assert all(rows[tuple(ids)] == 2 for ids in col(p.train) if tok.decode(ids).count("river"))  # each row twice
    # stone: 8 rows once, then 4 more of them: every row at least once, none more than twice
    assert sorted(n for ids, n in rows.items() if "stone" in tok.decode(list(ids)))[0] >= 1

    again = build(data, tok, seed=1)
    other = build(data, tok, seed=2)
    assert col(again.train) == col(p.train)  # deterministic from the seed...
    assert col(other.train) != col(p.train)  # ...and the seed matters


def test_sources_are_shuffled_together(tok, tmp_path):
    a, b = _many(tmp_path, "a.jsonl", 20, "apple"), _many(tmp_path, "b.jsonl", 20, "river")
    p = build(DataSection(sources=[{"path": str(a), "format": "alpaca"}, {"path": str(b), "format": "alpaca"}]), tok)
    first_half = [row["source"] for row in p.train][:20]
    assert 0 < sum(first_half) < 20  # not all of source 0 then all of source 1


@pytest.mark.parametrize("val_size, n_val", [(0.25, 5), (7, 7)])
def test_validation_split_by_fraction_or_count_is_seeded(tok, tmp_path, val_size, n_val):
    path = _many(tmp_path, "d.jsonl", 20, "apple")
    p = build(_data(path, val_size=val_size), tok, seed=3)
    assert (len(p.train), len(p.val)) == (20 - n_val, n_val) and p.stats.val_rows == n_val
    again = build(_data(path, val_size=val_size), tok, seed=3)
    assert col(p.val) == col(again.val) and col(p.train) == col(again.train)
    assert not set(map(tuple, col(p.train))) & set(map(tuple, col(p.val)))


def test_validation_rows_are_held_out_before_sources_are_repeated(tok, tmp_path):
    data = DataSection(sources=[{"path": str(_many(tmp_path, "d.jsonl", 20, "apple")), "format": "alpaca",
                                 "weight": 3}], val_size=5)
    p = build(data, tok)
    assert len(p.val) == 5 and len(p.train) == 45 and p.stats.sources[0].held_out == 5
    assert not set(map(tuple, col(p.train))) & set(map(tuple, col(p.val)))


def test_validation_from_its_own_source(tok, tmp_path):
    data = DataSection(
        sources=[{"path": str(_many(tmp_path, "t.jsonl", 12, "apple")), "format": "alpaca"}],
        val_sources=[{"path": str(_many(tmp_path, "v.jsonl", 6, "river")), "format": "alpaca"}],
    )
    p = build(data, tok)
    assert len(p.train) == 12 and len(p.val) == 6
    assert all("river" in tok.decode(ids) for ids in col(p.val))
    assert p.stats.val_sources[0].used == 6


def test_validation_larger_than_data_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError) as err:
        build(_data(_write(tmp_path / "d.jsonl", ROWS), val_size=4), tok)
    assert err.value.problems[0].where == "data.val_size"


# ---------------------------------------------------------------------------------------------
# Bad rows: on_bad_row


BAD_JSONL = "\n".join([
    json.dumps(ROWS[0]),
    '{"instruction": oops}',                                           # line 2: malformed JSON
    json.dumps({"instruction": "x", "input": "", "output": ""}),       # line 3: empty field
    "",                                                                # blank lines are not rows
    json.dumps({"instruction": 5, "input": "", "output": "y"}),        # line 5: not a string
    json.dumps({"input": "", "output": "y"}),                          # line 6: missing field
    json.dumps(ROWS[1]),
]) + "\n"


def test_bad_rows_are_skipped_counted_and_located_by_default(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_JSONL)
    p = build(_data(path), tok)
    assert p.stats.train_rows == 2 and p.stats.bad_rows == 4 and p.stats.sources[0].rows == 6
    assert p.stats.bad_row_examples == [
        f"{path}: line 2: malformed JSON: Expecting value at character 17",
        f"{path}: line 3: field 'output' is missing or empty",
        f"{path}: line 5: field 'instruction' must be a string, got int",
        f"{path}: line 6: field 'instruction' is missing or empty",
    ]


def test_rows_read_by_datasets_keep_their_line_numbers_across_blank_lines(tok, tmp_path):
    """A JSON lines file that `datasets` reads (valid JSON) with blank and whitespace-only lines: a bad
    row is still named by its own line, and the scan found the blank lines that make row != line."""
    from qlora_cli.data.sources import _scan_json

    path = tmp_path / "gaps.jsonl"
    lines = ["", json.dumps(ROWS[0]), "   ", json.dumps({"instruction": "x", "input": "", "output": ""}),
             "\t", json.dumps(ROWS[1]), " "]
    path.write_text("\n".join(lines))  # the last line is spaces without a line end
    assert _scan_json(path).blank_line
    p = build(_data(path), tok)
    assert p.stats.train_rows == 2 and p.stats.bad_rows == 1
    assert p.stats.bad_row_examples == [f"{path}: line 4: field 'output' is missing or empty"]


@pytest.mark.parametrize("block, blank", [
    (b'{"a": 1}\n{"a": 2}\n', False),
    (b'{"a": 1}\n{"a": 2}', False),
    (b'\n{"a": 1}\n', True),           # the first line
    (b' \r\n{"a": 1}\n', True),        # whitespace alone, CRLF
    (b'{"a": 1}\n\t\n{"a": 2}\n', True),
    (b'{"a": 1}\n  ', True),           # the last line, without a line end
    (b'{"a": " "}\n{"a": "\\n"}\n', False),
])
def test_blank_lines_are_found_in_a_block(block, blank):
    from qlora_cli.data.sources import _has_blank_line

    assert _has_blank_line(block) is blank


def test_bad_rows_stop_the_run_with_on_bad_row_error(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_JSONL)
    with pytest.raises(UserError) as err:
        build(_data(path, on_bad_row="error"), tok)
    assert [p.where for p in err.value.problems] == [f"{path}: line {n}" for n in (2, 3, 5, 6)]
    assert "4 bad row(s)" in err.value.header


def test_bad_rows_in_a_json_array_are_located_by_row(tok, tmp_path):
    rows = ROWS + [{"instruction": "x", "input": "", "output": ""}, {"instruction": 5, "input": "", "output": "y"}]
    path = _write(tmp_path / "bad.json", rows)
    p = build(_data(path), tok)
    assert p.stats.bad_row_examples[0] == f"{path}: row 5: field 'output' is missing or empty"
    assert p.stats.bad_row_examples[1].startswith(f"{path}: row 6: ")


def test_a_broken_json_array_names_the_line(tok, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": oops}\n]')
    with pytest.raises(UserError) as err:
        build(_data(path), tok)
    assert err.value.problems[0].where == "data.sources[0].path" and "at line 3" in err.value.problems[0].message


# ---------------------------------------------------------------------------------------------
# Length: on_too_long, and examples whose response starts too late


LONG = {"instruction": "Count.", "input": "", "output": " ".join(["1"] * 200)}


def test_too_long_examples_are_truncated_by_default(tok, tmp_path):
    p = build(_data(_write(tmp_path / "d.jsonl", ROWS + [LONG]), max_seq_len=128), tok)
    assert p.stats.truncated == 1 and p.stats.train_rows == 5
    assert max(len(ids) for ids in col(p.train)) == 128
    long_row = next(r for r in p.train if r["length"] > 128)
    assert len(long_row["input_ids"]) == 128 and long_row["trained"] > 0
    assert p.stats.train_tokens == sum(len(ids) for ids in col(p.train))
    assert p.stats.trained_tokens == sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in col(p.train, "labels"))


def test_too_long_examples_can_be_dropped(tok, tmp_path):
    p = build(_data(_write(tmp_path / "d.jsonl", ROWS + [LONG]), max_seq_len=128, on_too_long="drop"), tok)
    assert p.stats.dropped_too_long == 1 and p.stats.truncated == 0 and p.stats.train_rows == 4
    assert max(len(ids) for ids in col(p.train)) < 128


def test_too_long_examples_can_stop_the_run(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", ROWS + [LONG])
    with pytest.raises(UserError) as err:
        build(_data(path, max_seq_len=128, on_too_long="error"), tok)
    assert err.value.problems[0].where == f"{path}: line 5"
    assert "more than max_seq_len=128" in err.value.problems[0].message


def _documents(tmp_path, words: list[int]):
    """A text corpus of documents of the given word counts ("w0 w1 ..."): lengths known in advance."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{i % 7}" for i in range(n))}) + "\n" for n in words))
    return path


def test_long_documents_can_be_split_into_blocks_and_every_token_is_trained(tok, tmp_path):
    from trl import pack_dataset

    path = _documents(tmp_path, [10, 150, 400, 30])
    cut = build(_data(path, fmt="text", max_seq_len=64, packing=True), tok, template=None)
    split = build(_data(path, fmt="text", max_seq_len=64, packing=True, on_too_long="split"), tok, template=None)
    lengths = sorted(len(ids) for ids in col(split.train))
    assert max(lengths) > 64  # kept whole here: TRL's bfd_split cuts them
    long = sum(n > 64 for n in lengths)
    assert split.stats.split_documents == long == 2 and split.stats.truncated == 0 and cut.stats.truncated == 2
    blocks = sum(-(-n // 64) for n in lengths)
    assert split.stats.blocks == blocks
    assert split.stats.train_tokens == sum(lengths) > cut.stats.train_tokens
    # A block's first token is never a target (it would be predicted from another example's end in
    # the packed row); every other token is.
    for ids, labels in zip(col(split.train), col(split.train, "labels")):
        assert [k for k, t in enumerate(labels) if t == IGNORE_INDEX] == list(range(0, len(ids), 64))
    assert split.stats.trained_tokens == sum(lengths) - blocks
    # `qlora data` says how many blocks each previewed document becomes.
    from qlora_cli.data.report import example_segments

    shown = example_segments(split.train, tok, len(split.train), block=64)
    assert sorted(e["blocks"] for e in shown) == sorted(-(-n // 64) for n in lengths)

    # What the trainer then sees (the strategy the run passes to TRL): rows of at most 64 tokens,
    # every token of every document, and the figures above describe them.
    train, _ = split.for_trainer()
    packed = pack_dataset(train, 64, "bfd_split")
    rows = [len(r["input_ids"]) for r in packed]
    assert max(rows) <= 64 and sum(rows) == sum(lengths)
    assert sum(len(r["seq_lengths"]) for r in packed) == blocks
    assert split.stats.batching["packed_rows"] == len(packed)


@pytest.mark.parametrize("changes, needle", [
    ({"packing": False}, "split needs data.packing: true"),
    ({"fmt": "alpaca"}, "split is for plain text (format: text), not alpaca"),
])
def test_splitting_is_refused_where_it_would_cut_examples(tmp_path, changes, needle):
    from qlora_cli.recipe.load import validate_recipe

    fmt = changes.pop("fmt", "text")
    data = {"sources": [{"path": "d.jsonl", "format": fmt}], "on_too_long": "split", "packing": True, **changes}
    with pytest.raises(UserError) as err:
        validate_recipe({"model": {"name_or_path": "m"}, "data": data})
    [problem] = err.value.problems
    assert problem.where == "data.on_too_long" and needle in problem.message


def test_rows_whose_response_is_cut_off_are_left_out_and_counted(tok, tmp_path):
    long_prompt = {"instruction": "Count. " * 60, "input": "", "output": "1 2"}
    p = build(_data(_write(tmp_path / "d.jsonl", ROWS + [long_prompt]), max_seq_len=100), tok)
    assert p.stats.dropped_no_response == 1 and p.stats.train_rows == 4 == len(p.train)
    assert all(any(t != IGNORE_INDEX for t in lab) for lab in col(p.train, "labels"))


def test_nothing_left_to_train_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError) as err:
        build(_data(_write(tmp_path / "d.jsonl", ROWS), max_seq_len=8), tok)
    assert err.value.problems[0].where == "data.sources[0].path"
    assert "4 have no response token within max_seq_len=8 (raise it)" in err.value.problems[0].message


def test_length_and_batching_statistics(tok, tmp_path):
    data = _data(_many(tmp_path, "d.jsonl", 30, "apple"), max_seq_len=128)
    # A run that does not pack is not given packing's figures (TRL's packing of every length is the
    # slowest statistic); `qlora data` asks for them, to compare.
    plain = build(data, tok).stats.batching
    assert "packed_rows" not in plain and plain["batches_per_epoch"] == 4  # 30 rows in batches of 8
    p = build(data, tok, packing_figures=True)
    assert {k: p.stats.batching[k] for k in plain} == plain
    lengths = sorted(len(ids) for ids in col(p.train))
    assert p.stats.lengths["min"] == lengths[0] and p.stats.lengths["max"] == lengths[-1]
    assert sum(c for *_, c in p.stats.histogram) == 30
    assert p.stats.histogram[0][0] == lengths[0] and p.stats.histogram[-1][1] == lengths[-1]  # the data's range
    b = p.stats.batching
    # packing puts two-plus of these ~45-token examples in each 128-token row
    assert b["packed_rows"] <= 30 / 2 and b["packed_batches_per_epoch"] < b["batches_per_epoch"]
    assert b["packing_efficiency"] == pytest.approx(sum(lengths) / (b["packed_rows"] * 128), abs=1e-4)
    assert 0 < b["padding_efficiency"] <= 1


def test_packing_statistics_equal_what_trl_packs_from_the_real_token_ids(tok, tmp_path):
    # The statistics pack rows of the right lengths (not the token ids); over 1,000 rows TRL packs
    # each map batch of 1,000 separately, so the row order must also be the trainer's for the counts
    # to agree. Lengths vary (1 to 40 words) so that the bins depend on which rows share a batch.
    from trl import pack_dataset

    rows = [{"instruction": "Say " + " ".join(["apple"] * (1 + i % 40)), "input": "", "output": f"apple {i}"}
            for i in range(2300)]
    data = _data(_write(tmp_path / "d.jsonl", rows), max_seq_len=128, val_size=0.1, packing=True)
    p = build(data, tok)
    lengths = _column(p.train, "length")
    assert lengths.min() < 48 < lengths.max()  # at 48, some rows are cut (TRL truncates them when packing)
    for max_len in (48, 128, 512):
        trl_packed = pack_dataset(p.train.select_columns(["input_ids"]), max_len, "bfd")
        stats = batching_efficiency(np.minimum(lengths, max_len), max_len, 8, seed=0)
        assert stats["packed_rows"] == len(trl_packed)
    assert p.stats.batching["packed_rows"] == len(pack_dataset(p.train.select_columns(["input_ids"]), 128, "bfd"))


def test_a_column_is_read_in_the_order_select_and_shuffle_set():
    from datasets import Dataset

    ds = Dataset.from_dict({"n": list(range(50)), "s": [str(i) for i in range(50)]})
    picked = ds.shuffle(seed=3).select([4, 4, 0, 49, 17])
    assert _column(picked, "n").tolist() == picked["n"][:]
    assert _column(picked, "s") == picked["s"][:]
    assert _column(ds, "n").tolist() == list(range(50))
    from datasets import concatenate_datasets

    chunked = concatenate_datasets([ds, ds.select(range(10))]).shuffle(seed=1)  # two Arrow chunks, reordered
    assert _column(chunked, "n").tolist() == chunked["n"][:]


@pytest.mark.parametrize("max_len", [8, 30])  # rows to cut in the batch; none (the batch's own path)
def test_flat_token_columns_equal_row_by_row_truncation_and_counts(max_len):
    """The vectorized batch step against the plain per-row rule, with empty, short and cut rows."""
    from qlora_cli.data.pipeline import _token_columns

    rng = np.random.default_rng(0)
    lengths = np.array([0, 1, 5, 12, 0, 30, 7, 8], dtype=np.int64)
    ids = rng.integers(0, 500, lengths.sum()).astype(np.int32)
    trained = rng.random(lengths.sum()) < 0.5
    trained[np.cumsum(lengths)[1] - 1] = True  # a one-token row whose only token is flagged: still 0 trained
    flags = trained.copy()
    columns = _token_columns(ids, trained, lengths, max_len)

    starts = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(len(lengths)):
        row_ids = ids[starts[i] : starts[i + 1]][:max_len].tolist()
        # The first token is never a target (in a packed row it would follow another example).
        row_labels = [t if f and k > 0 else IGNORE_INDEX
                      for k, (t, f) in enumerate(zip(row_ids, trained[starts[i] : starts[i + 1]]))]
        assert columns["input_ids"][i].as_py() == row_ids
        assert columns["labels"][i].as_py() == row_labels
        assert columns["trained"][i].as_py() == sum(label != IGNORE_INDEX for label in row_labels)

    # split: rows kept whole, and each max_len block starts without a target.
    columns = _token_columns(ids, trained, lengths, max_len, split=True)
    for i in range(len(lengths)):
        row_ids = ids[starts[i] : starts[i + 1]].tolist()
        row_labels = [t if f and k % max_len else IGNORE_INDEX
                      for k, (t, f) in enumerate(zip(row_ids, trained[starts[i] : starts[i + 1]]))]
        assert columns["input_ids"][i].as_py() == row_ids
        assert columns["labels"][i].as_py() == row_labels
        assert columns["trained"][i].as_py() == sum(label != IGNORE_INDEX for label in row_labels)
    assert (trained == flags).all()  # the caller's flags are not written into
    assert columns["labels"].type.value_type == "int32" and columns["input_ids"].type.value_type == "int32"


def test_tokenizing_in_several_processes_gives_the_rows_of_one(tok, tmp_path, monkeypatch):
    """The map's workers get the tokenizer by inheritance (data/inherit.py), not pickled per job:
    the same rows, ids and labels as in one process."""
    from qlora_cli.data import pipeline

    rows = [{**r, "output": f"{r['output']} {i}"} for i, r in enumerate(ROWS * 10)]
    data = _data(_write(tmp_path / "d.jsonl", rows), num_proc=2)
    one = build(data.model_copy(update={"num_proc": 1}), tok)
    monkeypatch.setattr(pipeline, "ROWS_PER_PROCESS", 10)  # 40 rows: two workers
    calls = []
    import datasets

    original = datasets.Dataset.map

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("num_proc"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    environ = os.environ
    two = build(data, tok)
    assert 2 in calls, calls
    # datasets swaps in a copy of os.environ after starting its workers; rich's Console holds the real
    # one (FORCE_COLOR set later went unseen: `qlora data` lost its colours in the tests that followed).
    assert os.environ is environ
    assert col(two.train) == col(one.train) and col(two.train, "labels") == col(one.train, "labels")
    assert col(two.train, "row") == col(one.train, "row")


def test_a_stand_in_is_the_object_itself_when_loaded(monkeypatch):
    """Forked workers find the object under its key; a worker that was not forked loads the copy the
    stand-in carries then; past the block, under fork, there is nothing to find, and it says so."""
    import pickle

    import multiprocess

    from qlora_cli.data.inherit import inherited

    obj = {"vocab": list(range(5))}
    with inherited(obj) as shipped:
        assert pickle.loads(pickle.dumps(shipped)) is obj  # inside the block (what a forked worker sees)
        monkeypatch.setattr(multiprocess, "get_start_method", lambda *a, **k: "spawn")
        carried = pickle.dumps(shipped)
        monkeypatch.setattr(multiprocess, "get_start_method", lambda *a, **k: "fork")
        forked = pickle.dumps(shipped)
    assert pickle.loads(carried) == obj  # a spawned worker: its own copy
    with pytest.raises(RuntimeError, match="num_proc: 1"):
        pickle.loads(forked)


# ---------------------------------------------------------------------------------------------
# Awkward input found in review: each must be a located bad row or a UserError, never a traceback.


def test_a_non_string_role_is_a_bad_row(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]})
                    + "\n" + json.dumps(SHAREGPT[1]) + "\n")
    p = build(_data(path, fmt="sharegpt"), tokenizer(tiny, "chatml"), template="chatml")
    assert p.stats.bad_rows == 1 and "conversations[0].from must be a string, got list" in p.stats.bad_row_examples[0]


def test_a_custom_template_with_a_syntax_error_is_a_recipe_error(tok, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(UserError) as err:
        resolve_template(str(bad), tok)
    assert err.value.problems[0].where == "data.template" and "not valid Jinja" in err.value.problems[0].message


def test_a_template_that_raises_on_a_row_makes_it_a_bad_row(tok, tmp_path):
    strict = tmp_path / "strict.jinja"
    strict.write_text("{%- for m in messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                      "{{ raise_exception('roles must alternate') }}"
                      "{%- endif %}{{ m['role'] + ': ' + m['content'] + eos_token }}{%- endfor %}")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}]
    p = build(_data(_write(tmp_path / "m.jsonl", rows), fmt="messages", template=str(strict)), tok,
              template=str(strict))
    assert p.stats.bad_rows == 1 and "refused this row: roles must alternate" in p.stats.bad_row_examples[0]


def test_content_changed_with_the_same_mtime_is_read_again(tok, tmp_path):
    import os

    path = _write(tmp_path / "d.jsonl", ROWS)
    stamp = path.stat().st_mtime_ns
    before = build(_data(path), tok)
    _write(path, [{**r, "output": "changed"} for r in ROWS])
    os.utime(path, ns=(stamp, stamp))  # as cp -p, rsync -a or unzip would leave it
    after = build(_data(path), tok)
    assert all("changed" in tok.decode(ids) for ids in col(after.train)) and col(after.train) != col(before.train)


def test_csv_from_excel_or_pandas_with_index_is_read(tok, tmp_path):
    import pandas as pd

    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffinstruction,input,output\nSay hi.,,hi\n".encode("utf-8"))
    indexed = tmp_path / "indexed.csv"
    pd.DataFrame(ROWS).to_csv(indexed)  # with pandas' default unnamed index column
    assert build(_data(bom), tok).stats.train_rows == 1
    assert build(_data(indexed), tok).stats.train_rows == 4


def test_json_lines_in_a_json_file_with_a_bad_line_are_skipped_by_line(tok, tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(ROWS[0]) + "\n{broken\n" + json.dumps(ROWS[1]) + "\n")
    p = build(_data(path), tok)
    assert p.stats.train_rows == 2 and p.stats.bad_row_examples[0].startswith(f"{path}: row 2: malformed JSON")


def test_invalid_utf8_is_a_bad_line_not_replacement_characters(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    p = build(_data(path), tok)
    assert p.stats.train_rows == 1 and p.stats.bad_row_examples == [f"{path}: line 2: the line is not valid UTF-8"]


def test_directories_skip_hidden_folders_and_stray_text_files(tok, tmp_path):
    d = tmp_path / "data"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    _write(d / "a.jsonl", ROWS)
    _write(d / ".ipynb_checkpoints" / "a-checkpoint.jsonl", ROWS)
    (d / "README.txt").write_text("about this data\n")
    p = build(_data(d), tok)
    assert p.stats.sources[0].files == [str(d / "a.jsonl")] and p.stats.train_rows == 4


def test_a_text_file_with_only_blank_lines_adds_nothing(tok, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("green water\n")
    (d / "empty.txt").write_text("\n\n  \n")
    assert build(_data(d, fmt="text"), tok, template=None).stats.train_rows == 1


def test_a_file_named_by_two_sources_is_refused(tok, tmp_path):
    path = _write(tmp_path / "d.jsonl", ROWS)
    data = DataSection(sources=[{"path": str(path), "format": "alpaca"}],
                       val_sources=[{"path": str(tmp_path / "*.jsonl"), "format": "alpaca"}])
    with pytest.raises(UserError) as err:
        build(data, tok)
    assert err.value.problems[0].where == "data.val_sources[0].path"
    assert "also read by data.sources[0]" in err.value.problems[0].message


def test_all_rows_bad_lists_the_reasons(tiny, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError) as err:
        build(_data(path, fmt="sharegpt"), tokenizer(tiny, "chatml"), template="chatml")
    assert "1 are bad rows" in err.value.problems[0].message
    assert "must be an object with 'from' and 'value'" in err.value.problems[1].message


def test_mapping_two_fields_to_one_column_is_refused(tok, tmp_path):
    data = _data(_write(tmp_path / "d.jsonl", ROWS), source={"columns": {"instruction": "output"}})
    with pytest.raises(UserError) as err:
        build(data, tok)
    assert err.value.problems[0].where == "data.sources[0].columns" and "mapped to two fields" in err.value.problems[0].message


@pytest.mark.parametrize("path, hub", [("tatsu-lab/alpaca", True), ("teknium/OpenHermes-2.5", True),
                                       ("./data/x", False), ("/abs/x", False), ("~/x", False), ("x.json.gz", False),
                                       ("train.JSONL", False)])
def test_hub_ids_are_told_from_paths(path, hub):
    from qlora_cli.data.sources import is_hub_id

    assert is_hub_id(path) is hub
