"""Tool overhead: `qlora train RECIPE` against two hand-written scripts on the same recipe.

    .venv/bin/python benchmarks/bench_overhead.py [--recipe configs/tiny.yaml] [--repeats 5] [--json OUT]
    .venv/bin/python benchmarks/bench_overhead.py --no-data-cache   # the tool tokenizes on every run
    .venv/bin/python benchmarks/bench_overhead.py --baselines trainer --repeats 10   # one baseline, more repeats

The baselines use the same libraries with none of qlora's own code; both read the same resolved
settings (load_recipe, a pure pydantic/YAML reader):
  - trainer: benchmarks/baseline_trainer.py, a plain `transformers.Trainer` (no TRL): tokenized by
    hand, padded by DataCollatorForSeq2Seq, transformers' own loss. The floor.
  - sft: benchmarks/baseline_sft.py, TRL's SFTTrainer on prompt/completion pairs, as TRL's docs
    write it (with TRL's defaults, e.g. its fused LM head for the loss).
Each run is a fresh process, and runs are interleaved (python -c pass, then the three programs in
an order that rotates every repeat) so changes in machine load hit all alike. One warm-up run of
each comes first and is not counted (it fills the OS file cache and, with the default data cache
on, qlora's tokenized-data cache in a private QLORA_CACHE_DIR: the measured tool runs are cache
hits, as a user's second run is).

Measured, medians over --repeats, for qlora against each baseline:
  - wall: each process's wall time minus the median wall time of `python -c pass` measured in the
    same run (interpreter start excluded);
  - train: the time inside trainer.train() (qlora: `runtime_s` in RUN/summary.json; baselines:
    their own train_s);
  - cpu: user + system CPU seconds of each process (corroboration: less sensitive to other load);
  - paired: the same three as the median (and quartiles) of each repeat's qlora/baseline ratio,
    whose runs were back to back.
Target: qlora/baseline <= 1.05 for wall and train, against either. Also checks that all trained
the same tokens.

Other processes on a small machine can slow one run by several times, which no number of repeats
averages away. So before each run the script waits (up to --max-wait s) until the machine is idle,
and it measures the CPU that other processes used during each run (from /proc/stat); runs where
they averaged more than --max-foreign cores are left out of the medians when at least 3 runs of
each kind are clean (all runs are in the JSON, with their foreign load).

Even on an idle machine, one process can train the tiny recipe 10-20% slower than the next, for
any of the programs, so 5 repeats resolve differences of about 10%, not 5%. Much of it was memory:
each step allocates and frees tens of MB, and glibc's dynamic mmap and trim thresholds decide per
process how much of it is faulted in afresh every step (0.13 M to 1.2 M page faults a run, 1 to 4 s
of system time). `qlora train` on the CPU now fixes both thresholds for its steps
(util/memory.keep_freed_heap; summary.json's cpu_heap_kept says whether it did); the hand-written
scripts keep glibc's defaults, as a user's script would. --same-heap gives all programs qlora's
setting through the environment (qlora's own then stands down), so the ratio is of the loops alone.
--malloc-mmap-threshold BYTES sets MALLOC_MMAP_THRESHOLD_ alone for all, which also pins the trim
threshold at 128 KB: an earlier experiment's setting.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora_cli.util.memory import MMAP_THRESHOLD_MAX

ROOT = Path(__file__).resolve().parents[1]
QLORA = Path(sys.executable).with_name("qlora")
BASELINES = {"trainer": ROOT / "benchmarks" / "baseline_trainer.py", "sft": ROOT / "benchmarks" / "baseline_sft.py"}
TARGET = 1.05
HZ = os.sysconf("SC_CLK_TCK")


def cpu_busy_s() -> float:
    """CPU seconds all processes have used since boot (every core; idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / HZ  # user..steal, less idle and iowait


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(max_wait: float, threshold: float) -> float:
    """Sleep until other processes use under `threshold` cores over 2 s (or max_wait passes).
    Returns the seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        busy = cpu_busy_s()
        time.sleep(2.0)
        if (cpu_busy_s() - busy) / 2.0 < threshold:
            break
        time.sleep(3.0)
    return time.perf_counter() - start


def timed(cmd: list[str], env: dict) -> dict:
    """Run cmd; its wall and CPU seconds, and the cores other processes used meanwhile on average."""
    busy, own = cpu_busy_s(), children_cpu_s()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_overhead: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    cpu = children_cpu_s() - own
    foreign = max(0.0, (cpu_busy_s() - busy - cpu) / wall)
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "foreign_cores": round(foreign, 3)}


def run_qlora(recipe: str, out: Path, env: dict, extra: list[str]) -> dict:
    t = timed([str(QLORA), "train", recipe, "--output-dir", str(out), "--overwrite", "--quiet", *extra], env)
    summary = json.loads((out / "summary.json").read_text())
    return {**t, "train_s": summary["runtime_s"], "tokens_seen": summary["tokens_seen"],
            "tokens_per_epoch": summary["data"]["train_tokens"], "trained_tokens_per_epoch": summary["data"]["trained_tokens"],
            "first_eval_loss": summary["first_eval_loss"], "eval_loss": summary["eval_loss"],
            "cpu_heap_kept": summary.get("cpu_heap_kept")}


def run_baseline(script: Path, recipe: str, out: Path, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    result = out.with_suffix(".json")
    t = timed([sys.executable, str(script), recipe, "--output-dir", str(out), "--json", str(result)], env)
    return {**t, **json.loads(result.read_text())}


def summarise(tool: list[dict], base: list[dict], interp: list[float], max_foreign: float) -> dict:
    clean = [[r for r in runs if r["foreign_cores"] <= max_foreign] for runs in (tool, base)]
    use_clean = all(len(c) >= 3 for c in clean)
    tool_used, base_used = clean if use_clean else (tool, base)
    start = statistics.median(interp)

    def med(runs, key, minus=0.0):
        return statistics.median(r[key] for r in runs) - minus

    figures = {
        "wall": (med(tool_used, "wall_s", start), med(base_used, "wall_s", start)),
        "train": (med(tool_used, "train_s"), med(base_used, "train_s")),
        "cpu": (med(tool_used, "cpu_s"), med(base_used, "cpu_s")),
    }
    # Each repeat's two runs were back to back, so their ratio cancels slow drifts in the machine's
    # speed; the spread of these ratios shows how far one repeat can be trusted.
    pairs = [(t, b) for t, b in zip(tool, base)
             if not use_clean or max(t["foreign_cores"], b["foreign_cores"]) <= max_foreign] or list(zip(tool, base))
    keys = {"wall": ("wall_s", start), "train": ("train_s", 0.0), "cpu": ("cpu_s", 0.0)}
    paired = {k: sorted((t[key] - minus) / (b[key] - minus) for t, b in pairs) for k, (key, minus) in keys.items()}
    return {
        "paired_ratio": {k: {"median": round(statistics.median(v), 4), "quartiles": [round(q, 4) for q in
                             statistics.quantiles(v, n=4)] if len(v) > 1 else None, "pairs": len(v)}
                         for k, v in paired.items()},
        "runs_used": {"qlora": len(tool_used), "baseline": len(base_used),
                      "which": f"runs with other load <= {max_foreign} cores" if use_clean else "all (too few clean runs)"},
        "python_start_s": round(start, 4),
        **{f"{k}_s": {"qlora": round(a, 3), "baseline": round(b, 3)} for k, (a, b) in figures.items()},
        "ratio": {k: round(a / b, 4) for k, (a, b) in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/tiny.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-data-cache", action="store_true", help="qlora tokenizes every run (--set data.cache=false)")
    parser.add_argument("--max-wait", type=float, default=300, help="seconds to wait for an idle machine before each run")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="a run is clean when other processes used at most this many cores on average")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ for both (e.g. 268435456): a fixed glibc threshold")
    parser.add_argument("--same-heap", action="store_true",
                        help="give every program qlora's glibc heap setting (keep_freed_heap) through the environment")
    parser.add_argument("--baselines", nargs="+", choices=sorted(BASELINES), default=sorted(BASELINES),
                        help="which hand-written scripts to run beside qlora (default: both); one alone leaves "
                             "time for more repeats")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qlora-overhead-"))
    env = {**os.environ, "QLORA_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.same_heap:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD_MAX)
        env["MALLOC_TRIM_THRESHOLD_"] = str(2 * MMAP_THRESHOLD_MAX)
    extra = ["--set", "data.cache=false"] if args.no_data_cache else []
    python_pass = [sys.executable, "-c", "pass"]

    chosen = {name: BASELINES[name] for name in args.baselines}
    runs: dict[str, list[dict]] = {"qlora": [], **{name: [] for name in chosen}}
    runners = {"qlora": lambda: run_qlora(args.recipe, work / "qlora", env, extra),
               **{name: (lambda script=script, name=name: run_baseline(script, args.recipe, work / name, env))
                  for name, script in chosen.items()}}
    for run in runners.values():  # warm-up: file cache, qlora's data cache
        run()
    interp, waited, order = [], 0.0, list(runners)
    for i in range(args.repeats):
        # Interleaved, in an order that rotates each repeat, so drifts in load and whatever one run
        # leaves behind for the next (page cache, dirty pages) hit all programs alike.
        interp += [timed(python_pass, env)["wall_s"] for _ in range(3)]
        for name in order[i % len(order):] + order[:i % len(order)]:
            waited += wait_until_idle(args.max_wait, args.max_foreign)
            runs[name].append(runners[name]())
        print(f"repeat {i + 1}/{args.repeats}: " + "; ".join(
            f"{name} {r[-1]['wall_s']:.2f} s wall, {r[-1]['train_s']:.2f} s train, {r[-1]['cpu_s']:.1f} s CPU, "
            f"other load {r[-1]['foreign_cores']:.2f} cores" for name, r in runs.items()), flush=True)
    shutil.rmtree(work, ignore_errors=True)

    against = {name: summarise(runs["qlora"], runs[name], interp, args.max_foreign) for name in chosen}
    tokens = {name: {k: r[0][k] for k in ("tokens_seen", "tokens_per_epoch", "trained_tokens_per_epoch")}
              for name, r in runs.items()}
    met = {name: {k: s["ratio"][k] <= TARGET for k in ("wall", "train")} for name, s in against.items()}
    result = {"recipe": args.recipe, "repeats": args.repeats, "data_cache": not args.no_data_cache,
              "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"),
              "malloc_trim_threshold": env.get("MALLOC_TRIM_THRESHOLD_"),
              "qlora_cpu_heap_kept": [r.get("cpu_heap_kept") for r in runs["qlora"]],
              "waited_for_idle_s": round(waited, 1), "against": against, "target_ratio": TARGET, "met": met,
              "tokens": tokens, "eval_loss": {name: r[0]["eval_loss"] for name, r in runs.items()},
              "runs": {**runs, "python_pass_s": interp}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print("tokens trained over the run: " + ", ".join(f"{n} {t['tokens_seen']:,}" for n, t in tokens.items())
          + "; per epoch: " + ", ".join(f"{n} {t['tokens_per_epoch']:,}" for n, t in tokens.items()))
    labels = {"wall": "wall time excluding interpreter start", "train": "time inside trainer.train()",
              "cpu": "CPU time (corroboration, no target)"}
    for name, summary in against.items():
        print(f"qlora against {name} ({BASELINES[name].name}), medians of {summary['runs_used']['which']}:")
        for key, label in labels.items():
            q, b = summary[f"{key}_s"]["qlora"], summary[f"{key}_s"]["baseline"]
            verdict = f" (target <= {TARGET}): {'met' if met[name][key] else 'NOT met'}" if key in met[name] else ""
            pr = summary["paired_ratio"][key]
            print(f"  {label}: qlora {q:.2f} s, {name} {b:.2f} s: ratio {q / b:.3f}{verdict}; "
                  f"per-repeat ratios: median {pr['median']:.3f}, quartiles {pr['quartiles']}")


if __name__ == "__main__":
    main()
