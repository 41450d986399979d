"""What a run directory and a model directory may make qlora do, and what they may not.

- Remote code runs only with --trust-remote-code on the command line, never because a recipe or a
  run directory says so; without the flag every command stops before loading and names the files.
- --overwrite deletes only what qlora wrote (its marker lists it), never a folder that merely
  holds a recipe.yaml, a file it did not write, or the recipe being trained.
- One writer per run: a second `qlora train` into a run being written is refused at once, and a
  run killed with SIGKILL leaves no stale lock (`--resume` works).
- Damaged adapter files, a read-only output directory and Ctrl-C during start-up end in a message.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_cli_errors import assert_user_error

# A model whose own code (auto_map) would run on load. Importing it leaves a marker file, so a test
# can tell whether it ran. The classes are Llama's, so with consent the model loads and answers.
CONFIG_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran\\n")
from transformers import LlamaConfig
class EvilConfig(LlamaConfig):
    pass
'''
MODELING_CODE = '''
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig
class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@pytest.fixture()
def evil_model(tiny, tmp_path):
    """(model directory with auto_map code, the marker file its code writes when imported)."""
    model = tmp_path / "evil-model"
    shutil.copytree(tiny / "model", model)
    marker = tmp_path / "remote-code-ran.txt"
    (model / "configuration_evil.py").write_text(CONFIG_CODE.format(marker=str(marker)))
    (model / "modeling_evil.py").write_text(MODELING_CODE)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def _run_copy(tiny_run, tmp_path, name="run") -> Path:
    run = tmp_path / name
    shutil.copytree(tiny_run, run)
    return run


def _assert_refused(result, *needles):
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"


# ---------------------------------------------------------------------------------------------
# 1. Remote code needs the person at the keyboard


def test_a_downloaded_run_cannot_run_its_models_code_without_the_flag(evil_model, tiny_run, tmp_path, qlora_main):
    model, marker = evil_model
    run = _run_copy(tiny_run, tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["model"].update(name_or_path=str(model), trust_remote_code=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    for command in (["generate", run, "--prompt", "hi"], ["eval", run, "--no-generate"], ["merge", run],
                    ["generate", model, "--prompt", "hi"], ["eval", model, "--data", tmp_path / "none.jsonl"]):
        result = qlora_main(*command)
        # What would run is named, and how to allow it.
        _assert_refused(result, "configuration_evil.py", "modeling_evil.py", "--trust-remote-code")
        assert not marker.exists(), f"qlora {command[0]} ran the model's code without consent"
    assert not (run / "merged").exists()

    # The recipe commands: the recipe declares the need; the command line still has to allow it.
    for command in ("train", "validate", "estimate", "data"):
        result = qlora_main(command, run / "recipe.yaml", *(["--output-dir", tmp_path / "new"] if command == "train" else []))
        _assert_refused(result, "model.trust_remote_code", "configuration_evil.py", "--trust-remote-code")
        assert not marker.exists()
    assert not (tmp_path / "new").exists()

    # With the flag, the code runs: the consent is what decides.
    result = qlora_main("generate", run, "--prompt", "hi", "--max-new-tokens", "2", "--greedy", "--trust-remote-code")
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()


def test_train_with_the_flag_says_what_will_run_before_any_work(evil_model, tiny, tmp_path, qlora_main):
    model, marker = evil_model
    bad_rows = tmp_path / "bad-rows.jsonl"  # no output column: the run stops once the data is read
    bad_rows.write_text('{"instruction": "Say hi.", "input": ""}\n')
    recipe = tmp_path / "remote.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model), "dtype": "float32", "trust_remote_code": True},
        "data": {"sources": [{"path": str(bad_rows), "format": "alpaca"}]},
        "output": {"dir": str(tmp_path / "out")},
    }))
    result = qlora_main("train", recipe, "--trust-remote-code")
    assert result.returncode == 2 and "has no column 'output'" in result.stderr, result.stderr
    warning = "--trust-remote-code: Python code from"
    assert warning in result.stderr and "configuration_evil.py, modeling_evil.py" in result.stderr
    assert result.stderr.index(warning) < result.stderr.index("has no column 'output'")


# ---------------------------------------------------------------------------------------------
# 2. --overwrite deletes only what qlora wrote


def test_overwrite_refuses_a_project_folder_that_holds_a_recipe(write_recipe, tmp_path, qlora_main):
    # The reproduction: `qlora train proj/recipe.yaml --output-dir proj --overwrite` deleted proj/.
    proj = tmp_path / "proj"
    (proj / "notes").mkdir(parents=True)
    (proj / "notes" / "ideas.md").write_text("mine\n")
    (proj / "train.py").write_text("print('mine')\n")
    recipe = proj / "recipe.yaml"
    recipe.write_text(write_recipe().read_text())
    before = {p: p.read_bytes() for p in proj.rglob("*") if p.is_file()}
    result = qlora_main("train", recipe, "--output-dir", proj, "--overwrite")
    _assert_refused(result, "output.dir", "written by qlora", ".qlora-run.json")
    assert {p: p.read_bytes() for p in proj.rglob("*") if p.is_file()} == before


def test_overwrite_refuses_a_run_holding_files_qlora_did_not_write(tiny_run, write_recipe, tmp_path, qlora_main):
    run = _run_copy(tiny_run, tmp_path)
    (run / "my-notes.txt").write_text("mine\n")
    (run / "plots").mkdir()
    before = sorted(p.name for p in run.iterdir())
    result = qlora_main("train", write_recipe(), "--output-dir", run, "--overwrite")
    _assert_refused(result, "my-notes.txt, plots", "qlora did not write")
    assert sorted(p.name for p in run.iterdir()) == before


def test_overwrite_never_deletes_the_recipe_being_trained(tiny_run, write_recipe, tmp_path, qlora_main):
    run = _run_copy(tiny_run, tmp_path)
    result = qlora_main("train", run / "recipe.yaml", "--output-dir", run, "--overwrite")
    _assert_refused(result, "--overwrite would delete", str((run / "recipe.yaml").resolve()))
    assert (run / "summary.json").is_file()


def test_overwrite_replaces_what_an_earlier_run_wrote(tiny_run, write_recipe, tmp_path, qlora_main):
    run = _run_copy(tiny_run, tmp_path)
    old = json.loads((run / ".qlora-run.json").read_text())["wrote"]
    assert {"adapter_model.safetensors", "tokenizer.json", "summary.json", "checkpoints"} <= set(old)
    (run / "merged").mkdir()  # as if `qlora merge` had written it: recorded in the marker
    from qlora_cli.outputs.run_dir import RunDir

    RunDir(run).record("merged")
    recipe = write_recipe({"train": {"max_steps": 2, "save_steps": 2, "eval_steps": None, "eval_on_start": False}})
    result = qlora_main("train", recipe, "--output-dir", run, "--overwrite", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-2"]  # the earlier run's checkpoints are gone
    assert not (run / "merged").exists()  # a merge of the old adapter would not match the new one


# ---------------------------------------------------------------------------------------------
# 3. One writer per run


def _train_proc(recipe, run_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--output-dir", str(run_dir), "--quiet", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.slow  # a training process, killed
def test_a_second_writer_is_refused_and_a_killed_run_leaves_no_stale_lock(write_recipe, tmp_path, qlora_main):
    from qlora_cli.outputs.run_dir import RunDir

    run = tmp_path / "run"
    recipe = write_recipe({"lora": {"r": 4, "alpha": 8},
                           "train": {"max_steps": 400, "batch_size": 4, "logging_steps": 1, "save_steps": 2,
                                     "eval_steps": None, "eval_on_start": False}})
    first = _train_proc(recipe, run)
    try:
        deadline = time.monotonic() + 120
        while RunDir(run).lock_holder() is None:  # taken before the model loads
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = qlora_main("train", recipe, "--output-dir", run, "--set", "train.max_steps=4")
        _assert_refused(second, "output.dir", "is being written by another qlora process", f"pid {first.pid}")
        resumed = qlora_main("train", recipe, "--output-dir", run, "--resume")
        _assert_refused(resumed, "--resume", "is being written by another qlora process")
        # Let the first run write a checkpoint, then kill it hard: the kernel drops its flock.
        manifest = run / "checkpoints" / "checkpoint-2" / "qlora_manifest.json"
        while not manifest.exists():
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert RunDir(run).lock_holder() is None
    result = qlora_main("train", recipe, "--output-dir", run, "--resume", "--set", "train.max_steps=4", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # every step logged once


def test_a_refused_recipe_leaves_no_directory_behind(write_recipe, tmp_path, qlora_main):
    # The lock is taken (creating the directory) before the checks that need the libraries; a run
    # that then fails on its data must still leave nothing.
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"instruction": "Say hi.", "input": ""}\n')
    recipe = write_recipe({"data": {"sources": [{"path": str(bad_rows), "format": "alpaca"}]}})
    result = qlora_main("train", recipe, "--output-dir", tmp_path / "fresh" / "run")
    _assert_refused(result, "has no column 'output'")
    assert not (tmp_path / "fresh" / "run").exists()


# ---------------------------------------------------------------------------------------------
# Damaged inputs and hostile environments


def test_a_damaged_adapter_is_a_message(tiny_run, tmp_path, qlora_main):
    truncated = _run_copy(tiny_run, tmp_path, "truncated")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    for command in (["generate", truncated, "--prompt", "hi"], ["eval", truncated, "--no-generate"]):
        _assert_refused(qlora_main(*command), "adapter_model.safetensors is damaged or incomplete", "copy the run")
    bad_config = _run_copy(tiny_run, tmp_path, "bad-config")
    (bad_config / "adapter_config.json").write_text("{not json")
    for command in (["eval", bad_config, "--no-generate"], ["generate", bad_config, "--prompt", "hi"]):
        _assert_refused(qlora_main(*command), "adapter_config.json is damaged or incomplete")
    extra = ["generate", tiny_run, "--prompt", "hi", "--adapter", f"other={truncated}"]
    _assert_refused(qlora_main(*extra), "--adapter other", "is damaged or incomplete")


@pytest.mark.slow  # a fresh interpreter in a mount namespace
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux) to mount a read-only filesystem")
def test_an_empty_output_directory_on_a_read_only_filesystem_is_refused_before_loading(write_recipe, tmp_path):
    # The output directory is itself a read-only mount in a writable parent: only its own
    # writability tells. A private mount namespace (unshare -rm) needs no privileges.
    out = tmp_path / "readonly"
    out.mkdir()
    recipe = write_recipe()
    script = (f"mount -t tmpfs -o ro tmpfs {out} || exit 77; "
              f"exec {sys.executable} -m qlora_cli train {recipe} --output-dir {out}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "COLUMNS": "200"})
    if proc.returncode == 77 or "unshare failed" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"this machine cannot mount in a user namespace: {proc.stderr.strip()[:200]}")
    assert_user_error(proc, "output.dir", "is not writable")


@pytest.mark.slow  # eight fresh interpreters, interrupted
def test_ctrl_c_during_start_up_prints_no_traceback(write_recipe):
    """Ctrl-C at several moments of `qlora validate`, most of them while the libraries import.

    Not before the interpreter itself is up: a signal during Python's own start-up (importing
    site) is Python's to report, not ours. So the first delay is twice the slowest of three bare
    interpreter starts on this machine, measured here."""
    recipe = write_recipe()
    starts = []
    for _ in range(3):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        starts.append(time.perf_counter() - began)
    first = 2 * max(starts)
    outcomes = []
    # Each child starts with Ctrl-C at its default, as a terminal starts a command. A test run started
    # in the background (`make test &`, nohup) ignores SIGINT, and children inherit an ignored signal
    # (Python then installs no KeyboardInterrupt handler and the Ctrl-C below would be lost); a
    # handled one is reset to the default in the child.
    runner_ignores = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if runner_ignores:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for extra in (0.0, 0.03, 0.07, 0.12, 0.2, 0.35, 0.6, 1.0):
            proc = subprocess.Popen([sys.executable, "-m", "qlora_cli", "validate", str(recipe), "-q"], cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(first + extra)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=120)
            outcomes.append((first + extra, proc.returncode, stderr))
    finally:
        if runner_ignores:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    for delay, code, stderr in outcomes:
        assert "Traceback" not in stderr, f"Ctrl-C after {delay:.2f}s:\n{stderr[-3000:]}"
        # 130, or death by the signal itself (-2, which a shell also shows as 130): CPython ends
        # that way when the interrupt lands in its own start-up or shutdown code.
        assert code in (130, -signal.SIGINT), f"Ctrl-C after {delay:.2f}s: exit {code}\n{stderr[-2000:]}"
