"""Hostile data (issue 23): lone surrogates, deeply nested JSON, and globs through symlinks.

Each case must end in a clear message (exit 2, file and line named, no traceback) or in a counted
skipped row, never in a crash; and a glob must read each real file once, whatever symlinks the
data folder holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import run_cli

LONE = '"a\\ud800b"'  # the JSON text of a string holding a lone surrogate: "a", U+D800, "b"


def _user_error(result, *needles):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result.stderr


def _nested(depth: int) -> str:
    """JSON text of a value nested `depth` levels deep (lists in lists)."""
    return "[" * depth + "]" * depth


def _tiny_lines(tiny) -> list[str]:
    return (tiny / "alpaca.jsonl").read_text().splitlines()  # 400 rows; the tiny recipe holds 40 out


def _recipe(write_recipe, path, **data):
    return write_recipe({"data": {"sources": [{"path": str(path), "format": "alpaca"}], **data}})


# --- (5) Lone surrogates ---------------------------------------------------------------------------


def test_lone_surrogate_in_a_jsonl_row_is_a_located_bad_row(tiny, tmp_path, write_recipe, qlora_main):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(_tiny_lines(tiny) + [f'{{"instruction": {LONE}, "input": "", "output": "x"}}']) + "\n")

    err = _ok(qlora_main("validate", "-q", _recipe(write_recipe, path)))  # on_bad_row: skip (the default)
    assert "360 train rows, 40 validation rows" in err and "1 bad rows skipped" in err, err

    result = qlora_main("validate", "-q", _recipe(write_recipe, path, on_bad_row="error"))
    _user_error(result, f"{path}: line 401", "surrogate", "'\\ud800'")


def test_lone_surrogate_in_a_json_array_is_a_bad_row_not_silently_dropped(tiny, tmp_path, write_recipe, qlora_main):
    # `datasets` reads a JSON array with ujson, which silently deletes a lone surrogate ("a\ud800b"
    # became "ab" and was trained on). A proper pair (an emoji written as two escapes) is text.
    rows = [json.loads(line) for line in _tiny_lines(tiny)]
    text = json.dumps(rows)[:-1]
    text += ', {"instruction": "smile \\ud83d\\ude00", "input": "", "output": "ok"}'
    text += f', {{"instruction": {LONE}, "input": "", "output": "x"}}]'
    path = tmp_path / "d.json"
    path.write_text(text)

    err = _ok(qlora_main("validate", "-q", _recipe(write_recipe, path)))
    assert "361 train rows, 40 validation rows" in err and "1 bad rows skipped" in err, err
    result = qlora_main("validate", "-q", _recipe(write_recipe, path, on_bad_row="error"))
    _user_error(result, f"{path}: row 402", "surrogate")


def test_lone_surrogates_in_every_format_are_bad_rows(tiny, tmp_path):
    """Conversations, tool definitions and plain text reach the tokenizer by other paths."""
    from qlora_cli.recipe.schema import DataSection, ModelSection
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.data.templates import apply_template, resolve_template
    from qlora_cli.model.load import load_tokenizer

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    template = resolve_template("chatml", tok)
    apply_template(template, tok)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    tool = {"name": "f", "description": "x\udc00"}
    cases = {
        "messages": [good, {"messages": [{"role": "user", "content": "\ud800"}, {"role": "assistant", "content": "a"}]},
                     {**good, "tools": json.dumps([tool])}],
        "text": [{"text": "green water"}, {"text": "bad \ud800 text"}],
    }
    for fmt, rows in cases.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps escapes the surrogates
        data = DataSection(sources=[{"path": str(path), "format": fmt}])
        stats = build_datasets(data, tok, template if fmt != "text" else None, seed=0, use_cache=False).stats
        assert stats.train_rows == 1 and stats.bad_rows == len(rows) - 1, (fmt, stats.bad_row_examples)
        assert all("surrogate" in e for e in stats.bad_row_examples), stats.bad_row_examples


@pytest.fixture()
def run_copy(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def test_eval_data_with_a_lone_surrogate_or_deep_row_is_refused(tiny, run_copy, tmp_path, qlora_main):
    lines = _tiny_lines(tiny)[:3]
    for name, row in (("sur", f'{{"instruction": {LONE}, "input": "", "output": "x"}}'),
                      ("deep", f'{{"instruction": "q", "input": "", "output": "x", "m": {_nested(3000)}}}')):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(lines + [row]) + "\n")
        _user_error(qlora_main("eval", str(run_copy), "--data", str(path)), f"{path}: line 4")
    assert not (run_copy / "eval_results.json").exists()

    # Without a recipe, eval guesses the format from the first row, which must not crash either.
    text = tmp_path / "text.jsonl"
    text.write_text(f'{{"text": "x", "m": {_nested(3000)}}}\n{{"text": "y"}}\n')
    _user_error(qlora_main("eval", str(tiny / "model"), "--data", str(text)), str(text), "line 1", "nested")


def test_generate_input_with_bad_lines_names_the_line(tiny_run, tmp_path, qlora_main):
    out = tmp_path / "out.jsonl"
    cases = {
        "sur": (b'{"prompt": "ok"}\n{"prompt": ' + LONE.encode() + b"}\n", 2, "surrogate"),
        "deep": (b'{"prompt": "x", "m": ' + _nested(3000).encode() + b"}\n", 1, "nested more than 100"),
        "latin1": (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', 2, "not valid UTF-8"),
    }
    for name, (content, line, needle) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        result = qlora_main("generate", str(tiny_run), "--input", str(path), "--output", str(out))
        _user_error(result, f"{path}:{line}", needle)
        assert not out.exists()


def test_generate_prompt_that_is_not_utf8_is_refused(tiny_run, qlora_main):
    # A byte that is not UTF-8 in argv reaches Python as a surrogate escape (\udce9 for 0xe9).
    proc = run_cli("generate", str(tiny_run), "--prompt", os.fsdecode(b"caf\xe9"), "--max-new-tokens", "2")
    _user_error(proc, "--prompt", "not valid UTF-8", "0xe9")
    result = qlora_main("generate", str(tiny_run), "--prompt", "hi", "--system", os.fsdecode(b"\xff"))
    _user_error(result, "--system", "not valid UTF-8", "0xff")


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_interactive_line_that_is_not_utf8_is_asked_again(errors, tiny_run):
    # Python decodes stdin with surrogateescape in the C locales, strictly in the others.
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "generate", str(tiny_run), "--interactive", "--max-new-tokens", "2"],
        input=b"caf\xe9\n/exit\n", capture_output=True, timeout=300,
        env={**os.environ, "PYTHONIOENCODING": f"utf-8:{errors}"},
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert "not valid UTF-8 (byte 0xe9" in stderr and "type it again" in stderr, stderr


# --- (6) Deeply nested JSON ------------------------------------------------------------------------


def test_depth_scan_counts_brackets_outside_strings_only():
    from qlora_cli.data.sources import MAX_JSON_DEPTH, deep_json_lines

    at_limit = json.dumps({"m": json.loads(_nested(MAX_JSON_DEPTH - 1))})  # the row object is a level too
    over = json.dumps({"m": json.loads(_nested(MAX_JSON_DEPTH))})
    assert deep_json_lines(at_limit.encode()) == {}
    assert deep_json_lines(over.encode()) == {1: MAX_JSON_DEPTH + 1}
    # brackets inside strings are text, whatever escapes come before the closing quote
    for text in ("[" * 500, 'say \\"' + "[" * 500, "ends in a backslash \\", '\\\\"' + "{" * 500):
        line = json.dumps({"s": text, "t": "[" * 500})
        assert json.loads(line)  # valid JSON
        assert deep_json_lines(line.encode()) == {}, text
    # JSON lines: each line starts again at depth 0, even after a broken line
    lines = ["[[[[" * 20, over, "{}", over]
    assert deep_json_lines("\n".join(lines).encode()) == {2: 101, 4: 101}
    # one value over many lines (a JSON array of rows): the depth carries from line to line. Line k
    # of this text opens level k (line 1 the array, 2 the row, 3 "m", ...), and the last is "[]".
    pretty = json.dumps([{"m": json.loads(_nested(MAX_JSON_DEPTH))}], indent=1)
    assert deep_json_lines(pretty.encode(), one_value=True) == {101: 101, 102: 102}
    assert deep_json_lines(pretty.encode()) == {}  # read as JSON lines, no line nests deeply


def _deep_jsonl(tiny, tmp_path, depth: int):
    path = tmp_path / "d.jsonl"
    row = f'{{"instruction": "q", "input": "", "output": "x", "m": {_nested(depth)}}}'
    path.write_text("\n".join(_tiny_lines(tiny) + [row]) + "\n")
    return path


def test_deeply_nested_jsonl_rows_are_located_bad_rows(tiny, tmp_path, write_recipe, qlora_main):
    path = _deep_jsonl(tiny, tmp_path, 3000)  # RecursionError in the json module
    err = _ok(qlora_main("validate", "-q", _recipe(write_recipe, path)))
    assert "360 train rows" in err and "1 bad rows skipped" in err, err
    result = qlora_main("validate", "-q", _recipe(write_recipe, path, on_bad_row="error"))
    _user_error(result, f"{path}: line 401", "nested more than 100 levels")


@pytest.mark.slow  # a fresh interpreter
def test_nesting_that_crashed_pyarrow_is_a_bad_row(tiny, tmp_path, write_recipe):
    # 30,000 levels: a segfault in pyarrow's JSON reader (exit 139), hence a real process.
    path = _deep_jsonl(tiny, tmp_path, 30000)
    err = _ok(run_cli("validate", "-q", str(_recipe(write_recipe, path))))
    assert "360 train rows" in err and "1 bad rows skipped" in err, err


def test_deeply_nested_json_array_is_refused_with_its_line(tiny, tmp_path, write_recipe, qlora_main):
    rows = [json.loads(line) for line in _tiny_lines(tiny)]
    rows[7]["m"] = "DEEP"
    text = json.dumps(rows, indent=1)
    line = text[: text.index('"DEEP"')].count("\n") + 1  # row 8's nesting is all on this line
    path = tmp_path / "d.json"
    path.write_text(text.replace('"DEEP"', _nested(3000)))
    result = qlora_main("validate", "-q", _recipe(write_recipe, path))
    _user_error(result, f"{path} line {line}:", "nested more than 100 levels")


def test_deeply_nested_tools_text_is_a_bad_row(tiny, tmp_path):
    from qlora_cli.recipe.schema import DataSection, ModelSection
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.data.templates import apply_template, resolve_template
    from qlora_cli.model.load import load_tokenizer

    tok = load_tokenizer(ModelSection(name_or_path=str(tiny / "model")))
    template = resolve_template("chatml", tok)
    apply_template(template, tok)
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tools": _nested(3000)}) + "\n")
    stats = build_datasets(DataSection(sources=[{"path": str(path), "format": "messages"}]), tok, template,
                           seed=0, use_cache=False).stats
    assert stats.train_rows == 1 and stats.bad_rows == 1
    assert "tools" in stats.bad_row_examples[0] and "nested more than 100" in stats.bad_row_examples[0]


# --- (12) Globs and symlinks -----------------------------------------------------------------------


@pytest.fixture()
def linked_data(tiny, tmp_path):
    """data/v3/train.jsonl (400 rows), with data/latest -> v3, data/current.jsonl -> v3/train.jsonl
    and a hidden data/.cache/old.jsonl."""
    data = tmp_path / "data"
    (data / "v3").mkdir(parents=True)
    (data / ".cache").mkdir()
    shutil.copy(tiny / "alpaca.jsonl", data / "v3" / "train.jsonl")
    shutil.copy(tiny / "alpaca.jsonl", data / ".cache" / "old.jsonl")
    (data / "latest").symlink_to("v3")
    (data / "current.jsonl").symlink_to("v3/train.jsonl")
    return data


def _files(path) -> list[str]:
    from qlora_cli.recipe.schema import DataSource
    from qlora_cli.data.sources import resolve_files

    return [os.path.realpath(f) for f in resolve_files(DataSource(path=str(path), format="alpaca"), "data.sources[0]")]


def test_globs_and_folders_read_each_real_file_once(linked_data, write_recipe, qlora_main):
    real = os.path.realpath(linked_data / "v3" / "train.jsonl")
    for path in (linked_data / "**" / "*.jsonl", linked_data / "*" / "*.jsonl", linked_data):
        assert _files(path) == [real], path

    err = _ok(qlora_main("validate", "-q", _recipe(write_recipe, linked_data / "**" / "*.jsonl")))
    assert "360 train rows, 40 validation rows" in err, err  # not 760: each row once, none both held out and trained


def test_a_link_back_up_the_tree_is_not_followed(tiny, tmp_path):
    # data/v1/again -> .. : glob.glob followed it about 40 times (until the kernel's ELOOP), one
    # more copy of every row each time.
    data = tmp_path / "data"
    (data / "v1").mkdir(parents=True)
    shutil.copy(tiny / "alpaca.jsonl", data / "v1" / "train.jsonl")
    (data / "v1" / "again").symlink_to("..")
    assert _files(data / "**" / "*.jsonl") == [os.path.realpath(data / "v1" / "train.jsonl")]


@pytest.mark.slow  # a fresh interpreter
def test_a_glob_does_not_walk_into_symlink_loops(tmp_path):
    # /proc/self/root is a link to /, so following links in ** walked the whole machine (and loops in it).
    code = (
        "from qlora_cli.recipe.schema import DataSource\n"
        "from qlora_cli.data.sources import resolve_files\n"
        "from qlora_cli.errors import UserError\n"
        "try:\n"
        "    resolve_files(DataSource(path='/proc/self/**/*.json', format='alpaca'), 'data.sources[0]')\n"
        "except UserError as exc:\n"
        "    print(exc)\n"
    )
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "holds no data files" in proc.stdout, proc.stderr[-2000:]


def test_validation_file_that_is_a_training_file_is_refused_naming_both(linked_data, write_recipe, qlora_main):
    train, val = linked_data / "v3" / "train.jsonl", linked_data / "latest" / "train.jsonl"
    recipe = write_recipe({"data": {
        "sources": [{"path": str(train), "format": "alpaca"}],
        "val_sources": [{"path": str(val), "format": "alpaca"}], "val_size": 0,
    }})
    _user_error(qlora_main("validate", "-q", recipe), "data.val_sources[0]", str(train), str(val))
