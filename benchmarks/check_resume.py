"""Measure resume exactness: train once uninterrupted, once killed with SIGKILL after a checkpoint
and resumed with --resume, then report the largest difference between the two adapters and whether
every logged loss matches.

    .venv/bin/python benchmarks/check_resume.py [--steps 40] [--kill-after 10] [--runs N]

Uses the tiny offline model (built into a temporary directory). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def qlora(*args: str, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "qlora_cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def losses(run: Path) -> list:
    return [(r["step"], r.get("loss"), r.get("eval_loss"))
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def main() -> None:
    import build_tiny
    from safetensors.torch import load_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kill-after", type=int, default=10, help="kill once this checkpoint exists")
    parser.add_argument("--runs", type=int, default=3, help="kill-and-resume repeats")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qlora-resume-"))
    tiny = build_tiny.build(tmp / "tiny")
    recipe = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    recipe["model"]["name_or_path"] = str(tiny / "model")
    recipe["data"]["sources"][0]["path"] = str(tiny / "alpaca.jsonl")
    recipe["train"].update(max_steps=args.steps, batch_size=8, logging_steps=1, eval_steps=args.kill_after * 2,
                           save_steps=args.kill_after)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    reference = tmp / "reference"
    assert qlora("train", str(path), "--output-dir", str(reference)).wait() == 0
    want = load_file(reference / "adapter_model.safetensors")
    results = []
    for i in range(args.runs):
        run = tmp / f"killed-{i}"
        proc = qlora("train", str(path), "--output-dir", str(run))
        manifest = run / "checkpoints" / f"checkpoint-{args.kill_after}" / "qlora_manifest.json"
        while not manifest.exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
        assert qlora("train", str(path), "--output-dir", str(run), "--resume").wait() == 0
        got = load_file(run / "adapter_model.safetensors")
        diff = max((got[k] - want[k]).abs().max().item() for k in want)
        results.append({"resumed_from_step": killed_at, "max_abs_diff": diff, "losses_equal": losses(run) == losses(reference)})
    print(json.dumps({"steps": args.steps, "tensors": len(want), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
