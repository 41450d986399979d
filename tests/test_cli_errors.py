"""Bad input through the real command line: exit code 2, the offending key or file named on stderr,
no traceback, and nothing written. Every case fails before training starts.

Most cases run the CLI's entry point in this process (qlora_main: the same parsing, printing and exit
codes, without re-importing torch each time); a fresh interpreter is started where the process is
what is tested: the console script, what --help and an early error import, a run across the process
boundary."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from qlora_cli.recipe.schema import json_schema

QLORA = Path(sys.executable).with_name("qlora")  # the console script installed next to this interpreter
HEAVY_MODULES = ("torch", "transformers", "datasets", "trl", "peft", "bitsandbytes")


def run_qlora(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run the `qlora` console script, as a user would type it."""
    assert QLORA.is_file(), f"console script not found at {QLORA}"
    return subprocess.run(
        [str(QLORA), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _env() -> dict:
    return {**os.environ, "COLUMNS": "200"}


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, a plain error message naming what to fix, no traceback, nothing on stdout."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "internal error" not in proc.stderr
    assert re.search(r"^error: ", proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr[-3000:]}"
    assert proc.stdout == ""  # the run directory is printed only after a successful run


def alpaca_rows(tiny: Path) -> list[dict]:
    return [json.loads(line) for line in (tiny / "alpaca.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Bad recipes: each one is reported before anything is written.


def _misspelled_key(tiny, tmp_path):
    return {"lora": {"alpah": 64}}, ["lora.alpah", "unknown key", "did you mean 'alpha'"]


def _wrong_type(tiny, tmp_path):
    return {"lora": {"r": "abc"}}, ["lora.r", "integer", "'abc'"]


def _missing_data_file(tiny, tmp_path):
    missing = tmp_path / "no-such-data.jsonl"
    sources = [{"path": str(missing), "format": "alpaca"}]
    return {"data": {"sources": sources}}, ["data.sources[0].path", "data file not found", str(missing)]


def _missing_model_dir(tiny, tmp_path):
    missing = tmp_path / "no-such-model"
    return {"model": {"name_or_path": str(missing)}}, [
        "model.name_or_path", "model directory not found", str(missing),
    ]


def _model_dir_without_config(tiny, tmp_path):
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"\0" * 16)
    return {"model": {"name_or_path": str(model)}}, ["model.name_or_path", "has no config.json", str(model)]


def _unknown_template(tiny, tmp_path):
    return {"data": {"template": "alpacca"}}, ["data.template", "unknown template 'alpacca'", "did you mean 'alpaca'"]


def _missing_column(tiny, tmp_path):
    sources = [{"path": str(tiny / "alpaca.jsonl"), "format": "alpaca", "columns": {"instruction": "question"}}]
    return {"data": {"sources": sources}}, ["data.sources[0].columns", "no column 'question'", "alpaca.jsonl"]


def _row_without_output(tiny, tmp_path):
    rows = alpaca_rows(tiny)
    del rows[2]["output"]
    path = tmp_path / "bad-rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [{"path": str(path), "format": "alpaca"}]
    return {"data": {"sources": sources, "on_bad_row": "error"}}, [
        "1 bad row(s)", f"{path}: line 3", "field 'output' is missing or empty", "data.on_bad_row: skip",
    ]


def _markup_in_path(tiny, tmp_path):
    # Rich markup in user text must be printed literally, not interpreted (or crash the printer).
    missing = tmp_path / "[/x]" / "[bold]d.jsonl"
    return {"data": {"sources": [{"path": str(missing), "format": "alpaca"}]}}, [str(missing)]


def _negative_seed(tiny, tmp_path):
    return {"train": {"seed": -5}}, ["train.seed", "greater than or equal to 0"]


def _adapter_on_lm_head(tiny, tmp_path):
    return {"lora": {"target_modules": ["q_proj", "lm_head"]}}, ["lora.target_modules", "modules_to_save"]


def _unknown_modules_to_save(tiny, tmp_path):
    return {"lora": {"modules_to_save": ["nope"]}}, ["lora.modules_to_save", "'nope'"]


def _missing_tracker(tiny, tmp_path):
    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    return {"train": {"report_to": ["mlflow"]}}, ["train.report_to", "mlflow is not installed"]


def _responses_beyond_max_seq_len(tiny, tmp_path):
    return {"data": {"max_seq_len": 8}}, ["data.sources[0].path", "nothing would be trained", "max_seq_len=8 (raise it)"]


def _output_dir_under_a_file(tiny, tmp_path):
    (tmp_path / "afile").write_text("x")
    return {"output": {"dir": str(tmp_path / "afile" / "run")}}, ["output.dir", "afile is a file, not a directory"]


BAD_RECIPES = [
    _markup_in_path,
    _negative_seed,
    _adapter_on_lm_head,
    _unknown_modules_to_save,
    _missing_tracker,
    _responses_beyond_max_seq_len,
    _output_dir_under_a_file,
    _misspelled_key,
    _wrong_type,
    _missing_data_file,
    _missing_model_dir,
    _model_dir_without_config,
    _unknown_template,
    _missing_column,
    _row_without_output,
]


@pytest.mark.parametrize("case", BAD_RECIPES, ids=[c.__name__.strip("_") for c in BAD_RECIPES])
def test_bad_recipe_exits_2_and_writes_nothing(write_recipe, tiny, tmp_path, case, qlora_main):
    changes, needles = case(tiny, tmp_path)
    recipe = write_recipe(changes)
    run_dir = tmp_path / "run"
    assert_user_error(qlora_main("train", str(recipe)), *needles)
    assert not run_dir.exists()


@pytest.mark.slow  # a fresh interpreter per case
@pytest.mark.parametrize("case", [_missing_data_file, _row_without_output], ids=["missing_data_file", "row_without_output"])
def test_bad_recipe_through_a_real_process(write_recipe, tiny, tmp_path, case):
    """The same contract across the process boundary (exit status, stderr, nothing written)."""
    changes, needles = case(tiny, tmp_path)
    proc = run_cli("train", str(write_recipe(changes)), timeout=180)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "run").exists()


def test_misspelled_set_key_exits_2(write_recipe, tmp_path, qlora_main):
    proc = qlora_main("train", str(write_recipe()), "--set", "lora.r=8", "--set", "lora.alpah=64")
    assert_user_error(proc, "lora.alpah (from --set)", "did you mean 'alpha'")
    assert not (tmp_path / "run").exists()


def test_existing_non_empty_output_dir_is_left_untouched(write_recipe, tmp_path, qlora_main):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    keep = run_dir / "keep.txt"
    keep.write_text("an earlier run's results\n")
    before = keep.stat().st_mtime_ns
    proc = qlora_main("train", str(write_recipe()))
    assert_user_error(proc, "output.dir", str(run_dir), "already exists and is not empty", "--overwrite")
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]
    assert keep.read_text() == "an earlier run's results\n"
    assert keep.stat().st_mtime_ns == before


def test_overwrite_never_deletes_a_directory_that_is_not_an_earlier_run(write_recipe, tmp_path, qlora_main):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    proc = qlora_main("train", str(write_recipe()), "--overwrite")
    assert_user_error(proc, "output.dir", "--overwrite only replaces an earlier run directory")
    assert (run_dir / "notes.txt").read_text() == "mine\n"


def test_overwrite_never_deletes_the_runs_own_inputs(write_recipe, tiny, tmp_path, qlora_main):
    # An earlier run whose merged model (recorded in its marker, so --overwrite could delete it) is
    # the base of this run: training on it into the same directory must not delete it.
    from qlora_cli.outputs.run_dir import RunDir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDir(run_dir).create(overwrite=False)
    shutil.copytree(tiny / "model", run_dir / "merged")
    RunDir(run_dir).record("merged")
    recipe = write_recipe({"model": {"name_or_path": str(run_dir / "merged"), "dtype": "float32"}})
    proc = qlora_main("train", str(recipe), "--overwrite")
    assert_user_error(proc, "output.dir", "--overwrite would delete", str(run_dir / "merged"))
    assert (run_dir / "merged" / "model.safetensors").is_file()


def test_recursive_yaml_alias_exits_2(tmp_path, qlora_main):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("a: &x [*x]\n")
    assert_user_error(qlora_main("validate", str(recipe)), "refers to itself")


# ---------------------------------------------------------------------------------------------
# The command line itself


@pytest.mark.slow  # a fresh interpreter
def test_help_lists_the_commands():
    # That --help stays instant is checked by what it imports (below), not by a timer.
    proc = run_qlora("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    for command in ("train", "validate", "schema"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a fresh interpreter
def test_help_imports_no_heavy_library():
    proc, heavy = _main_in_a_fresh_process("--help")
    assert proc.returncode == 0, proc.stderr
    assert heavy == []


def _main_in_a_fresh_process(*args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI's main() in a new interpreter; also return which heavy libraries it imported."""
    code = (
        "import sys\n"
        "from qlora_cli.cli import main\n"
        f"sys.argv = ['qlora', *{list(args)!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        f"print('HEAVY', sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=_env())
    heavy = proc.stdout.splitlines()[-1] if proc.stdout else ""
    assert heavy.startswith("HEAVY "), proc.stdout + proc.stderr[-3000:]
    proc.stdout = "\n".join(proc.stdout.splitlines()[:-1])
    return proc, ast.literal_eval(heavy.removeprefix("HEAVY "))


@pytest.mark.slow  # a fresh interpreter per case
def test_input_mistakes_are_reported_before_any_library_loads(write_recipe, tiny, tmp_path):
    """A typo or a wrong path costs the user a fraction of a second, not the seconds torch,
    transformers and bitsandbytes take to import: each is reported before any of them is imported."""
    good = write_recipe()
    cases = {
        "misspelled key": (["train", str(write_recipe(_misspelled_key(tiny, tmp_path)[0], "typo.yaml"))],
                           ["lora.alpah", "did you mean 'alpha'"]),
        "--set typo": (["train", str(good), "--set", "lora.alpah=64"], ["lora.alpah (from --set)"]),
        "missing data file": (["train", str(write_recipe(_missing_data_file(tiny, tmp_path)[0], "data.yaml"))],
                              ["data.sources[0].path", "data file not found"]),
        "missing model": (["train", str(write_recipe(_missing_model_dir(tiny, tmp_path)[0], "model.yaml"))],
                          ["model.name_or_path", "model directory not found"]),
        "output dir in the way": (["train", str(good), "--output-dir", str(tiny)],
                                  ["output.dir", "already exists and is not empty"]),
        "resume of no run": (["train", str(good), "--resume", "--output-dir", str(tmp_path / "empty")],
                             ["--resume", "is not a run directory"]),
        "validate, missing data": (["validate", str(tmp_path / "data.yaml")], ["data file not found"]),
        "data, missing data": (["data", str(tmp_path / "data.yaml")], ["data file not found"]),
        "estimate, missing model": (["estimate", str(tmp_path / "model.yaml")], ["model directory not found"]),
    }
    (tmp_path / "empty").mkdir()
    for name, (args, needles) in cases.items():
        proc, heavy = _main_in_a_fresh_process(*args)
        assert_user_error(proc, *needles)
        assert heavy == [], f"{name}: {heavy} imported before the error"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # fresh interpreters, one loading the training stack
def test_bitsandbytes_import_notice_stays_out_of_the_output(write_recipe, tmp_path):
    """On CPUs with AVX-512 BF16, importing bitsandbytes logs that the optional `kernels` package
    is missing: noise ahead of every message. The CLI quiets that logger before anything imports
    bitsandbytes (checked in a fresh interpreter), so not even a run that stops after loading the
    training stack shows it (that part can only fail on such a CPU, which this project's have)."""
    code = ("import logging, sys\n"
            "from qlora_cli.cli import _quiet_libraries\n"
            "_quiet_libraries()\n"
            "print('bitsandbytes' in sys.modules, logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["False", str(logging.ERROR)], proc.stdout + proc.stderr[-2000:]
    rows = tmp_path / "no-output.jsonl"  # refused once the data is read, after the libraries load
    rows.write_text('{"instruction": "Say hi.", "input": ""}\n')
    proc = run_cli("train", str(write_recipe({"data": {"sources": [{"path": str(rows), "format": "alpaca"}]}})),
                   timeout=180)
    assert_user_error(proc, "has no column 'output'")
    assert "kernels" not in proc.stderr, proc.stderr


@pytest.mark.slow  # a training run in a fresh interpreter (warnings reach stderr only outside pytest)
def test_a_paged_optimizer_without_a_gpu_is_one_note_before_the_run_not_a_warning_inside_it(write_recipe):
    recipe = write_recipe({"train": {"optimizer": "paged_adamw_8bit", "max_steps": 2, "eval_steps": None,
                                     "save_steps": 2, "logging_steps": 1}})
    proc = run_cli("train", str(recipe), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.optimizer is paged_adamw_8bit: with no GPU, bitsandbytes runs it without paging" in proc.stderr
    assert "Paged optimizers are not supported" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow  # two fresh interpreters
def test_module_help_matches_console_script_help_but_for_the_program_name():
    console = run_qlora("--help", timeout=60)
    module = run_cli("--help", timeout=60)
    assert console.returncode == module.returncode == 0
    assert "Usage: qlora " in console.stdout

    def lines(text: str) -> list[str]:  # rich pads each line to the terminal width
        return [line.rstrip() for line in text.splitlines()]

    assert lines(module.stdout.replace("python -m qlora_cli", "qlora")) == lines(console.stdout)


@pytest.mark.slow  # two fresh interpreters
def test_module_help_equals_console_script_help():
    assert run_cli("--help", timeout=60).stdout == run_qlora("--help", timeout=60).stdout


@pytest.mark.slow  # a fresh interpreter per case
@pytest.mark.parametrize("entry", ["console-script", "python-m"])
@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "{recipe}", "--no-such-flag"], "--no-such-flag"),
        (["train"], "recipe"),
        (["no-such-command"], "no-such-command"),
    ],
    ids=["unknown-flag", "missing-argument", "unknown-command"],
)
def test_usage_errors_exit_2_without_traceback(write_recipe, tmp_path, entry, args, needle):
    args = [a.format(recipe=write_recipe()) for a in args]
    proc = run_qlora(*args, timeout=60) if entry == "console-script" else run_cli(*args, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert needle in proc.stderr.lower()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a fresh interpreter
def test_schema_prints_the_recipe_json_schema():
    proc = run_qlora("schema", timeout=60)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema == json.loads(json.dumps(json_schema()))
    assert schema["title"] == "Recipe"
    assert {"model", "data", "lora"} <= set(schema["properties"])
