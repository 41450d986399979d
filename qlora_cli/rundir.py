"""The run directory: its layout, written and read in one place.

    RUN/adapter_model.safetensors, adapter_config.json, README.md   standard PEFT layout
    RUN/tokenizer.json, tokenizer_config.json, chat_template.jinja  tokenizer with the run's template
    RUN/recipe.yaml      the fully resolved recipe, defaults included
    RUN/metrics.jsonl    one JSON object per logging or evaluation step
    RUN/README.md        model card: recipe essentials, results, how to load it with plain peft
    RUN/loss.png         train loss (raw and smoothed) and eval loss against step
    RUN/summary.json     written last: its presence means the run completed
    RUN/checkpoints/     trainer checkpoints (adapter, optimizer, scheduler, RNG state)

Everything a later command needs (the adapter, the tokenizer with its template, the recipe) is
here, so a run can be used given nothing but this directory's path.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qlora_cli.errors import UserError

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LOSS_PLOT = "loss.png"
MODEL_CARD = "README.md"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def check_available(self, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
        """Refuse an output directory that would clobber something, before any work is done.

        A non-empty directory is refused unless --overwrite; and --overwrite only ever replaces an
        earlier run directory (one with recipe.yaml), never one that holds the model, the data or
        the working directory, so a mistyped path cannot delete your inputs.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError.single("output.dir", f"{path} exists and is a file: choose another output.dir")
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
            raise UserError.single("output.dir", f"cannot create {path}: {parent} is not a writable directory")
        if not (path.is_dir() and any(path.iterdir())):
            return
        if not overwrite:
            raise UserError.single(
                "output.dir",
                f"{path} already exists and is not empty: choose another output.dir (or --output-dir), "
                "or pass --overwrite to replace an earlier run",
            )
        if not (path / RECIPE).is_file():
            raise UserError.single(
                "output.dir", f"--overwrite only replaces an earlier run directory, and {path} has no {RECIPE}"
            )
        here = path.resolve()
        for inside in (Path.cwd(), *protected):
            inside = Path(inside).resolve()
            if inside == here or here in inside.parents:
                raise UserError.single("output.dir", f"--overwrite would delete {inside}, which this run needs")

    def create(self, overwrite: bool) -> None:
        if overwrite and self.path.is_dir():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_recipe(self, recipe) -> None:
        (self.path / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the last line of a run killed mid-write
                continue
        return records

    def prepare_resume(self, step: int) -> None:
        """Before continuing from checkpoint-STEP: forget what the interrupted run logged after it
        (the resumed run logs those steps again), and mark the run unfinished until it is."""
        from qlora_cli.checkpoints import remove_staging

        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        tmp = self.path / (METRICS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path / METRICS)
        (self.path / SUMMARY).unlink(missing_ok=True)
        remove_staging(self.checkpoints)

    @property
    def final_staging(self) -> Path:
        """Where save_final writes before renaming into place (a fixed path every rank can name)."""
        return self.path / ".final.partial"

    def save_final(self, save_adapter, tokenizer) -> None:
        """The adapter (`save_adapter(directory)`, e.g. a PeftModel's save_pretrained) and tokenizer,
        saved beside the run directory's files and then renamed in one file at a time, so no file
        in the run directory is ever half written."""
        staging = self.final_staging
        shutil.rmtree(staging, ignore_errors=True)
        try:
            save_adapter(staging)
            tokenizer.save_pretrained(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: free what was written
            raise
        for path in staging.iterdir():
            os.replace(path, self.path / path.name)
        staging.rmdir()

    def write_summary(self, summary: dict) -> None:
        """Write summary.json last, via a temporary name, so a partial file never looks like a finished run."""
        tmp = self.path / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / SUMMARY)
