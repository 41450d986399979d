"""CLI start-up: `qlora --help` wall time against `python -c pass`, in the same run; and how soon
a mistake in the recipe or a path is reported, against importing the training stack.

    .venv/bin/python benchmarks/bench_startup.py [--repeats 15]

All are started as fresh processes with the same interpreter; the figures are medians, and the
difference from `python -c pass` is what the tool itself costs before doing anything (the target
is under 0.5 s). The two mistakes (a misspelled key given with --set, a data file that does not
exist) exit 2; `import qlora_cli.train.run` is what reporting them after loading torch, transformers,
peft and bitsandbytes would cost. The tiny model is built in a temporary directory for the
recipe to point at.

And on a terminal (a pseudo-terminal, as a user's shell gives), for `qlora train` of the tiny recipe
cut to 2 steps: the seconds until its first output (the loading spinner, issue 27) and until the
announcement that follows the loading (the first output before the spinner existed), medians of
--train-repeats. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QLORA = Path(sys.executable).with_name("qlora")


def wall(cmd: list[str], expect: int = 0, needle: str = "") -> float:
    """Seconds the command takes; it must exit `expect` and, if given, say `needle` on stderr
    (so an error case times the error it is meant to, not another one)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    assert proc.returncode == expect and needle in proc.stderr, f"{cmd}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    return seconds


def on_terminal(cmd: list[str], marks: dict[str, bytes]) -> dict[str, float]:
    """Run cmd with stdout and stderr on a pseudo-terminal; the seconds from start until its first
    byte ("first output") and until each of `marks` appears in what it wrote."""
    import os
    import pty
    import select

    main_fd, child_fd = pty.openpty()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=child_fd, stderr=child_fd,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(child_fd)
    seen, out = {}, b""
    while True:
        if select.select([main_fd], [], [], 0.5)[0]:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            now = time.perf_counter() - start
            out += data
            seen.setdefault("first output", now)
            for name, needle in marks.items():
                if needle in out:
                    seen.setdefault(name, now)
        elif proc.poll() is not None:
            break
    os.close(main_fd)
    assert proc.wait() == 0 and len(seen) == len(marks) + 1, out[-2000:].decode(errors="replace")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-repeats", type=int, default=5, help="repeats of the 2-step run on a terminal")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench_startup."))
    tiny = build_tiny.build(tmp / "tiny")
    recipe = [str(QLORA), "train", "configs/tiny.yaml", "--set", f"model.name_or_path={tiny / 'model'}",
              "--output-dir", str(tmp / "run")]
    commands = {  # name: (command, expected exit code, what stderr must say)
        "python -c pass": ([sys.executable, "-c", "pass"], 0, ""),
        "qlora --help": ([str(QLORA), "--help"], 0, ""),
        "qlora train --help": ([str(QLORA), "train", "--help"], 0, ""),
        "train, misspelled key": ([*recipe, "--set", f"data.sources[0].path={tiny / 'alpaca.jsonl'}",
                                   "--set", "lora.alpah=16"], 2, "did you mean 'alpha'"),
        "train, missing data file": ([*recipe, "--set", f"data.sources[0].path={tmp / 'missing.jsonl'}"], 2,
                                     "data file not found"),
        "import qlora_cli.train.run": ([sys.executable, "-c", "import qlora_cli.train.run"], 0, ""),
    }
    for case in commands.values():  # warm the file cache
        wall(*case)
    samples = {name: [] for name in commands}
    for _ in range(args.repeats):  # interleaved, so load changes hit every command alike
        for name, case in commands.items():
            samples[name].append(wall(*case))
    medians = {name: round(statistics.median(v), 4) for name, v in samples.items()}
    base = medians["python -c pass"]

    short = [*recipe, "--set", f"data.sources[0].path={tiny / 'alpaca.jsonl'}", "--set", "train.max_steps=2",
             "--set", "train.eval_steps=2", "--set", "train.save_steps=2", "--overwrite"]
    marks = {"announcement (after loading)": b"LoRA r="}
    on_tty = [on_terminal(short, marks) for _ in range(args.train_repeats + 1)][1:]  # the first warms caches
    terminal = {name: round(statistics.median(r[name] for r in on_tty), 3) for name in on_tty[0]}
    print(json.dumps({"repeats": args.repeats, "median_s": medians,
                      "over_python_s": {k: round(v - base, 4) for k, v in medians.items() if k != "python -c pass"},
                      "train_on_a_terminal_s": {"repeats": args.train_repeats, **terminal}},
                     indent=2))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
