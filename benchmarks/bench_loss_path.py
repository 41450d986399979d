"""train.loss_path: TRL's fused LM head against transformers' plain loss, same process, same recipe.

    .venv/bin/python benchmarks/bench_loss_path.py [--recipe configs/tiny.yaml] [--steps 60] [--repeats 3]

Builds the recipe's trainer (build_trainer: the tool's own path) with loss_path fused, then plain,
interleaved, and times trainer.train() for --steps steps; prints each run's time and logged losses,
and the medians and their ratio. The losses must agree (to float rounding): the paths differ in
speed and memory only. Run it on the machine whose default (`auto`) you want to check: on the CPU
the fused head folds its chunks in plain torch, on CUDA it is a Triton kernel.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from qlora_cli.outputs.run_dir import RunDir
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.train.run import build_trainer

    times: dict[str, list[float]] = {"fused": [], "plain": []}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for path in ("fused", "plain") if repeat % 2 == 0 else ("plain", "fused"):
                recipe = load_recipe(args.recipe, [f"train.loss_path={path}", f"train.max_steps={args.steps}",
                                                   "train.eval_steps=null", "train.eval_on_start=false",
                                                   f"train.save_steps={args.steps * 10}"])
                trainer = build_trainer(recipe, RunDir(Path(tmp) / f"{path}{repeat}"), display="quiet").trainer
                start = time.perf_counter()
                trainer.train()
                times[path].append(time.perf_counter() - start)
                losses[path] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
                print(f"{path:5s} {times[path][-1]:6.2f} s  losses {[round(x, 5) for x in losses[path]]}", flush=True)
    fused, plain = statistics.median(times["fused"]), statistics.median(times["plain"])
    print(f"median over {args.repeats}: fused {fused:.2f} s, plain {plain:.2f} s for {args.steps} steps: "
          f"fused/plain {fused / plain:.2f}; largest loss difference "
          f"{max(abs(a - b) for a, b in zip(losses['fused'], losses['plain'])):.2g}")


if __name__ == "__main__":
    main()
