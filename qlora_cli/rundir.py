"""The run directory: its layout, written and read in one place.

    RUN/adapter_model.safetensors, adapter_config.json, README.md   standard PEFT layout
    RUN/tokenizer.json, tokenizer_config.json, chat_template.jinja  tokenizer with the run's template
    RUN/recipe.yaml      the fully resolved recipe, defaults included
    RUN/metrics.jsonl    one JSON object per logging or evaluation step
    RUN/summary.json     written last: its presence means the run completed
    RUN/checkpoints/     trainer checkpoints (adapter, optimizer, scheduler, RNG state)

`merge`, `eval` and `generate` need nothing but this directory's path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qlora_cli.errors import UserError

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def check_available(self, overwrite: bool, flag: str = "--output-dir") -> None:
        """Refuse to train into a non-empty directory, so an earlier run is never clobbered by accident."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError.single(flag, f"{self.path} exists and is not a directory: choose another output.dir")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise UserError.single(
                "output.dir",
                f"{self.path} already exists and is not empty: choose another output.dir (or --output-dir), "
                "or pass --overwrite to replace it",
            )

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
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        """Write summary.json last, via a temporary name, so a partial file never looks like a finished run."""
        tmp = self.path / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path / SUMMARY)

    def read_summary(self) -> dict | None:
        path = self.path / SUMMARY
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
