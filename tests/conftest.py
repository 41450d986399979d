"""Shared fixtures: the tiny offline model and data, built once per session, and recipe helpers.

Nothing here touches the network or ../shared: the model, tokenizer and data are generated
by scripts/build_tiny.py, deterministically, in a few seconds.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # build_tiny, check_templates, recipe_reference
sys.path.insert(0, str(ROOT / "benchmarks"))  # architecture_matrix, bench_activations

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # fail fast instead of retrying a hub that is not there
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tokenized-data cache of the suite lives apart from the user's (~/.cache/qlora), and is fresh
# each session; tests/test_cache.py points it at a per-test directory where that matters.
os.environ["QLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="qlora-test-cache-")


SLOW_FIXTURES = {"tiny_run", "tiny_run_proc"}  # the 200-step training run of configs/tiny.yaml (below)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(config, items):
    """Every test that needs the session's trained tiny run is `slow` (left out of `make test-fast`):
    that run alone takes longer than the whole fast tier may."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    """A tokenized-data cache of the test's own (QLORA_CACHE_DIR); returns where the data entries go."""
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Directory with model/, alpaca.jsonl and chat.jsonl (see scripts/build_tiny.py)."""
    import build_tiny

    return build_tiny.build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_run_proc(tiny, tmp_path_factory):
    """configs/tiny.yaml (the demo's recipe) trained once through the CLI, the way a user would:
    model and data paths relative to the directory `qlora train` runs in, and --output-dir
    overriding output.dir. Returns (run directory, the finished process). Shared by several test
    files, so tests must not write into the run directory: copy it first."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    raw = tiny_recipe(tiny, tmp / "elsewhere")
    raw["model"]["name_or_path"] = os.path.relpath(raw["model"]["name_or_path"], tiny.parent)
    raw["data"]["sources"][0]["path"] = os.path.relpath(raw["data"]["sources"][0]["path"], tiny.parent)
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    # 200 steps: under a minute on 2 idle cores, but over 600 s (run_cli's default limit) has been
    # seen on a loaded machine.
    proc = run_cli("train", str(recipe), "--output-dir", str(tmp / "run"), cwd=tiny.parent, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


@pytest.fixture(scope="session")
def tiny_run(tiny_run_proc) -> Path:
    return tiny_run_proc[0]


def tiny_recipe(tiny: Path, output_dir: Path) -> dict:
    """configs/tiny.yaml as shipped, pointed at a built tiny model/data and an output directory."""
    recipe = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tiny / "model")
    recipe["data"]["sources"][0]["path"] = str(tiny / "alpaca.jsonl")
    recipe["output"]["dir"] = str(output_dir)
    return recipe


def recipe_file(tiny: Path, directory: Path, changes: dict) -> Path:
    """configs/tiny.yaml pointed at the tiny model and data, with each section of CHANGES merged in,
    written to DIRECTORY/recipe.yaml (for module-scoped fixtures, which cannot use write_recipe)."""
    raw = tiny_recipe(tiny, directory / "unused")
    for section, values in changes.items():
        raw[section].update(values)
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def write_recipe(tiny, tmp_path):
    """write_recipe({"lora": {"r": 4}}) -> path of configs/tiny.yaml pointed at the session's tiny
    model and data, with the given sections merged in, and output.dir under tmp_path."""

    def write(changes: dict | None = None, name: str = "recipe.yaml") -> Path:
        recipe = tiny_recipe(tiny, tmp_path / "run")
        for section, values in (changes or {}).items():
            if isinstance(values, dict) and isinstance(recipe.get(section), dict):
                recipe[section].update(values)
            else:
                recipe[section] = values
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m qlora_cli ARGS` the way a user would, capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "qlora_cli", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def qlora_main(capsys, monkeypatch):
    """qlora_main("train", "r.yaml") -> Result: the CLI's real entry point (argument parsing, error
    printing, exit codes) run in this process. Much cheaper than a subprocess once torch is
    imported; use run_cli where the process boundary itself matters."""

    monkeypatch.setenv("COLUMNS", "200")  # as run_cli: long paths stay on one line

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None) -> Result:
        """CWD, ENV and INPUT as run_cli's and subprocess.run's: the working directory, extra
        environment variables and standard input, for this call only."""
        from qlora_cli import cli

        capsys.readouterr()  # start clean
        with monkeypatch.context() as patch:
            if cwd is not None:
                patch.chdir(cwd)
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            if input is not None:
                patch.setattr(sys, "stdin", io.StringIO(input))
            argv, sys.argv = sys.argv, ["qlora", *map(str, args)]
            try:
                cli.main()
                code = 0
            except SystemExit as exc:
                code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1  # as Python exits
            finally:
                sys.argv = argv
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
