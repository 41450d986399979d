"""CLI start-up: `qlora --help` wall time against `python -c pass`, in the same run.

    .venv/bin/python scripts/bench_startup.py [--repeats 15]

Both are started as fresh processes with the same interpreter; the figures are medians, and the
difference is what the tool itself costs before doing anything (the target is under 0.5 s).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

QLORA = Path(sys.executable).with_name("qlora")


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "qlora --help": [str(QLORA), "--help"],
        "qlora train --help": [str(QLORA), "train", "--help"],
    }
    for cmd in commands.values():  # warm the file cache
        wall(cmd)
    samples = {name: [] for name in commands}
    for _ in range(args.repeats):  # interleaved, so load changes hit every command alike
        for name, cmd in commands.items():
            samples[name].append(wall(cmd))
    medians = {name: round(statistics.median(v), 4) for name, v in samples.items()}
    base = medians["python -c pass"]
    print(json.dumps({"repeats": args.repeats, "median_s": medians,
                      "over_python_s": {k: round(v - base, 4) for k, v in medians.items() if k != "python -c pass"}},
                     indent=2))


if __name__ == "__main__":
    main()
