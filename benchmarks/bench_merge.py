"""Benchmark the peak memory of `qlora merge` against a naive whole-model PEFT merge_and_unload.

    .venv/bin/python benchmarks/bench_merge.py [--work DIR] [--repeats N] [--json PATH]
    .venv/bin/python benchmarks/bench_merge.py --variants streamed --repeats 1     # quick look

The requirement: `qlora merge` streams shard by shard, so its peak resident memory stays bounded by
about one input shard plus one output shard plus the adapter, not the whole model. Target: the peak
resident memory above the interpreter's baseline stays under 40% of the model's size on disk.

Setup (once, cached under --work, default /tmp/bench_merge; --rebuild redoes it):
  - model/: a random Llama (hidden 1024, 16 layers, vocab 8192, untied head), ~1.14 GB of fp32 in
    >= 8 safetensors shards, with a tiny BPE tokenizer (scripts/build_tiny.py);
  - run/: what `qlora train` would leave: recipe.yaml (configs/tiny.yaml pointed at model/, fp32)
    and a fabricated LoRA adapter on every linear layer (r=16, alpha=32, lora_B random and non-zero
    so the merge does real work), plus the tokenizer. No training: the weights' values do not
    change the memory a merge needs.

Measured, each in a fresh interpreter (so peaks never mix) and --repeats times (median reported):
  - streamed:      merge(run, verify=False), output in the recipe's dtype (fp32);
  - streamed-bf16: the same with dtype="bf16";
  - streamed-mmap: `streamed` with glibc's MALLOC_MMAP_THRESHOLD_=1MiB, a diagnostic: the gap to
                   `streamed` is memory malloc keeps after the merge freed it (see CHILD_ENV);
  - naive:         AutoModelForCausalLM.from_pretrained (fp32) + PeftModel.from_pretrained +
                   merge_and_unload() + save_pretrained(), the usual recipe.
The child imports every library first, then reads its baseline VmRSS and resets the kernel's peak
RSS counter (VmHWM, via /proc/self/clear_refs) so the import's own transient peak does not count;
after the merge it reads VmHWM. The figure is VmHWM - baseline. A sampling thread also records
how the resident memory near the peak splits into anonymous memory (tensors we allocated) and
file-backed pages (safetensors shards are memory-mapped, and the pages read count as resident).
The fidelity check is off (verify=False) because it loads whole models, which is not what is
measured here. After every run the output's index is checked against the base's tensor names,
shapes and sizes, so a merge that wrote nothing (or too little) cannot pass. Exit status: 1 when
the streamed merge misses the target, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))  # build_tiny, for the tokenizer and its corpus

TARGET = 0.40  # peak above baseline, as a fraction of the model's size on disk
MIB = 2**20

# A Llama shape that makes >= 1 GB of fp32 from many mid-sized tensors (the largest, an MLP
# projection, is 16 MiB), so the shard size, not one huge tensor, decides the peak.
MODEL = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=16, vocab_size=8192, max_position_embeddings=512, tie_word_embeddings=False,
)
SHARD_SIZE = "120MB"  # -> 10 shards of ~114 MB; the requirement asks for at least 8
MIN_SHARDS, MIN_BYTES = 8, 10**9
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SETUP_VERSION = 2  # bump when the setup changes, so cached work dirs are rebuilt

VARIANTS = {
    "streamed": "qlora merge, fp32 (the recipe's dtype)",
    "streamed-bf16": "qlora merge --dtype bf16",
    "streamed-mmap": "qlora merge, fp32, with glibc's MALLOC_MMAP_THRESHOLD_=1MiB (diagnostic, see below)",
    "naive": "from_pretrained + PeftModel + merge_and_unload + save_pretrained (fp32)",
}
# streamed-mmap: glibc serves the merge's 4-16 MiB tensors from its heap once a freed one has
# raised its dynamic mmap threshold (up to 32 MiB), and keeps freed heap chunks resident. A fixed
# 1 MiB threshold makes every such tensor its own mapping, returned to the OS when freed, so the
# difference to `streamed` is the allocator's retention, not data the merge holds.
CHILD_ENV = {"streamed-mmap": {"MALLOC_MMAP_THRESHOLD_": str(2**20)}}


# --- Setup: the model and a run directory ------------------------------------------------------


def setup(work: Path, rebuild: bool) -> dict:
    """Build (or reuse) work/model and work/run. Returns the facts about them (setup.json)."""
    marker = work / "setup.json"
    if marker.is_file() and not rebuild:
        info = json.loads(marker.read_text())
        if info.get("version") == SETUP_VERSION and (work / "run" / "adapter_model.safetensors").is_file():
            print(f"reusing {work} (pass --rebuild to build it again)")
            return info
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(work)
    model_dir, run_dir = work / "model", work / "run"
    meta_model = build_model(model_dir, tokenizer)
    build_adapter(meta_model, run_dir, model_dir)
    tokenizer.save_pretrained(run_dir)
    write_recipe(run_dir, model_dir, work / "alpaca.jsonl")
    info = {"version": SETUP_VERSION, "seconds": round(time.perf_counter() - t0, 1), **describe_model(model_dir)}
    marker.write_text(json.dumps(info, indent=2) + "\n")  # written last: its presence means setup finished
    print(f"built {model_dir} ({info['bytes'] / 1e9:.2f} GB, {len(info['shards'])} shards) in {info['seconds']} s")
    return info


def build_tokenizer(work: Path):
    """The tiny byte-level BPE of scripts/build_tiny.py, trained on its Alpaca rows (also saved as
    the recipe's data file, which only the fidelity check would read)."""
    import build_tiny

    rows = build_tiny.alpaca_rows(200, seed=1)
    build_tiny._write_jsonl(work / "alpaca.jsonl", rows)
    return build_tiny.build_tokenizer([" ".join(r.values()) for r in rows])


def build_model(model_dir: Path, tokenizer):
    """A random LlamaForCausalLM saved in >= 8 shards. Returns the same model on the meta device
    (shapes only), for deriving the adapter's names."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{**MODEL, "vocab_size": max(MODEL["vocab_size"], len(tokenizer))},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    # Construct on the meta device and fill each tensor directly: the default initialisation
    # (kaiming_uniform over ~285M weights) would only cost time, and the values do not matter.
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    model = meta.to_empty(device="cpu")  # uninitialised memory, filled below
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    model.save_pretrained(model_dir, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(model_dir)
    del model
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def build_adapter(meta_model, run_dir: Path, model_dir: Path) -> None:
    """A LoRA adapter as PEFT's save_pretrained writes it, without loading the model into PEFT.

    The key names and shapes come from PEFT itself (get_peft_model on the meta-device model, then
    get_peft_model_state_dict, the function save_pretrained uses), so they are exactly what
    PeftModel.from_pretrained and `qlora merge` expect; only the values are made up here.
    """
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    config = LoraConfig(**LORA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(meta_model, config)
    config.base_model_name_or_path = str(model_dir)  # get_peft_model sets it from the (pathless) meta model
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for key, t in get_peft_model_state_dict(peft_model).items():
        # lora_A like PEFT's init scale (~1/sqrt(in)); lora_B small but non-zero, unlike PEFT's
        # zero init, so every adapted weight really changes.
        std = 1 / t.shape[1] ** 0.5 if ".lora_A." in key else 0.01
        tensors[key] = torch.randn(tuple(t.shape), generator=gen) * std
    if not tensors or not any(".lora_B." in k for k in tensors):
        raise SystemExit("bench_merge: PEFT produced no LoRA weights for the model; check LORA's target_modules")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(run_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(run_dir)


def write_recipe(run_dir: Path, model_dir: Path, data_file: Path) -> None:
    """recipe.yaml as `qlora train` writes it: configs/tiny.yaml (as tests/conftest.py's
    tiny_recipe points it) at the big model, with fp32 weights and compute."""
    import yaml

    from qlora_cli.recipe.load import validate_recipe
    from qlora_cli.outputs.run_dir import RunDir

    recipe = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    recipe["model"]["name_or_path"] = str(model_dir)
    recipe["model"]["dtype"] = "float32"
    recipe["quant"]["compute_dtype"] = "float32"
    recipe["lora"].update(r=LORA["r"], alpha=LORA["lora_alpha"])
    recipe["data"]["sources"][0]["path"] = str(data_file)
    recipe["output"]["dir"] = str(run_dir)
    RunDir(run_dir).write_recipe(validate_recipe(recipe))


def describe_model(model_dir: Path) -> dict:
    """Shards, size on disk and tensor layout of the base; fails loudly below the required size."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    size = sum((model_dir / s).stat().st_size for s in shards)
    tensors = read_layout(model_dir)
    if len(shards) < MIN_SHARDS or size < MIN_BYTES:
        raise SystemExit(f"bench_merge: the model has {len(shards)} shards and {size / 1e9:.2f} GB; the benchmark "
                         f"needs >= {MIN_SHARDS} shards and >= {MIN_BYTES / 1e9:.0f} GB: adjust MODEL or SHARD_SIZE")
    params = sum(n for n, _ in tensors.values())
    largest = max((model_dir / s).stat().st_size for s in shards)
    return {"model_dir": str(model_dir), "run_dir": str(model_dir.parent / "run"), "bytes": size,
            "params": params, "shards": shards, "largest_shard_bytes": largest, "config": MODEL, "lora": LORA}


def read_layout(folder: Path) -> dict[str, tuple[int, str]]:
    """name -> (element count, safetensors dtype) for every tensor of a sharded checkpoint, from
    the headers only."""
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    layout = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                layout[k] = (n, sl.get_dtype())
    return layout


# --- The measured child process -----------------------------------------------------------------


def child(variant: str, info: dict, out: Path) -> dict:
    """Run one variant in this (fresh) process; return its memory figures."""
    import_everything()
    import gc

    gc.collect()
    base = proc_status()
    baseline = base["VmRSS"]
    reset_peak()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    if variant == "naive":
        naive_merge(Path(info["model_dir"]), Path(info["run_dir"]), out)
    else:
        from qlora_cli.merge.run import merge

        merge(info["run_dir"], output=out, dtype="bf16" if variant == "streamed-bf16" else None,
              verify=False, overwrite=True)
    seconds = time.perf_counter() - t0
    sampler.stop()
    peak = peak_rss()
    # Near the peak (as sampled), how much of the growth is anonymous memory (tensors allocated
    # by the merge) and how much file-backed (pages of the memory-mapped input shards).
    grown = {k: sampler.at_peak.get(k, base[k]) - base[k] for k in ("RssAnon", "RssFile")}
    return {"baseline_kib": baseline, "peak_kib": peak, "above_kib": peak - baseline,
            "seconds": round(seconds, 2), "sampled_peak_kib": sampler.at_peak.get("VmRSS", baseline) - baseline,
            "anon_at_peak_kib": grown["RssAnon"], "file_at_peak_kib": grown["RssFile"],
            "max_anon_kib": sampler.max_anon - base["RssAnon"], "max_file_kib": sampler.max_file - base["RssFile"]}


def import_everything() -> None:
    """Everything either variant imports, so what is measured is the merge, not module loading."""
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import PeftModel  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (transformers imports lazily)

    import qlora_cli.recipe.schema  # noqa: F401
    import qlora_cli.merge.run  # noqa: F401
    import qlora_cli.model.load  # noqa: F401
    import qlora_cli.train.run  # noqa: F401  (merge's report reads library versions from it)


def naive_merge(model_dir: Path, run_dir: Path, out: Path) -> None:
    """The usual way: the whole fp32 model in memory, adapter applied, merged, saved."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(run_dir))
    merged = model.merge_and_unload()
    merged.save_pretrained(out, max_shard_size=SHARD_SIZE)


def proc_status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in KiB."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(Vm\w+|Rss\w+):\s+(\d+) kB", text, re.M)}


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the import's transient peak is forgotten.
    Where that is not allowed, peak_rss() falls back to the lifetime peak: an overestimate."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    # VmHWM honours reset_peak(); ru_maxrss (KiB on Linux) is the same counter without the reset.
    try:
        return proc_status()["VmHWM"]
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class Sampler(threading.Thread):
    """Polls /proc/self/status to split the resident memory into anonymous and file-backed pages.

    Only for the diagnosis: a 10 ms poll can miss a short-lived peak, which VmHWM never does.
    Torch releases the GIL in its kernels and safetensors in its I/O, so the poll keeps running.
    """

    def __init__(self):
        super().__init__(daemon=True)
        self.halt = threading.Event()
        self.at_peak: dict[str, int] = {}
        self.max_anon = self.max_file = 0

    def run(self):
        while not self.halt.wait(0.01):
            s = proc_status()
            if s["VmRSS"] > self.at_peak.get("VmRSS", 0):
                self.at_peak = {k: s[k] for k in ("VmRSS", "RssAnon", "RssFile")}
            self.max_anon, self.max_file = max(self.max_anon, s["RssAnon"]), max(self.max_file, s["RssFile"])

    def stop(self):
        self.halt.set()
        self.join()


# --- The parent: run, check, report ---------------------------------------------------------


def measure(variant: str, info: dict, work: Path) -> dict:
    """One fresh process for one run of one variant; then check what it wrote."""
    out = work / "out" / variant
    shutil.rmtree(out, ignore_errors=True)  # every run writes from scratch
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **CHILD_ENV.get(variant, {})}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--work", str(work)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench_merge: the {variant} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    check_output(out, Path(info["model_dir"]), bytes_per_float=2 if variant == "streamed-bf16" else 4)
    return result


def check_output(out: Path, base: Path, bytes_per_float: int) -> None:
    """The merged model must hold every base tensor, same element count, in the expected dtype,
    and its shards must exist with (at least) that much data."""
    base_layout, out_layout = read_layout(base), read_layout(out)
    if set(out_layout) != set(base_layout):
        missing, extra = sorted(set(base_layout) - set(out_layout)), sorted(set(out_layout) - set(base_layout))
        raise SystemExit(f"bench_merge: {out} does not match the base: missing {missing[:5]}, extra {extra[:5]}")
    want = {4: "F32", 2: "BF16"}[bytes_per_float]
    wrong = [k for k, (n, dt) in out_layout.items() if n != base_layout[k][0] or dt != want]
    if wrong:
        raise SystemExit(f"bench_merge: {out}: {len(wrong)} tensors differ in size or dtype from the base, e.g. {wrong[0]}")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk = sum((out / s).stat().st_size for s in set(index["weight_map"].values()))
    expected = sum(n for n, _ in base_layout.values()) * bytes_per_float
    if on_disk < expected:
        raise SystemExit(f"bench_merge: {out} holds {on_disk} bytes of shards, {expected} expected")


def summarize(runs: dict[str, list[dict]], model_bytes: int) -> dict:
    summary = {}
    for variant, rs in runs.items():
        above = statistics.median(r["above_kib"] for r in rs) * 1024
        summary[variant] = {
            "peak_above_baseline_mib": round(above / MIB, 1),
            "fraction_of_model": round(above / model_bytes, 4),
            "seconds": statistics.median(r["seconds"] for r in rs),
            "baseline_mib": round(statistics.median(r["baseline_kib"] for r in rs) / 1024, 1),
            "anon_at_peak_mib": round(statistics.median(r["anon_at_peak_kib"] for r in rs) / 1024, 1),
            "file_at_peak_mib": round(statistics.median(r["file_at_peak_kib"] for r in rs) / 1024, 1),
        }
    return summary


def print_table(info: dict, summary: dict, repeats: int) -> None:
    print()
    print(f"model: {info['params'] / 1e6:.0f}M params, {info['bytes'] / MIB:.0f} MiB fp32 on disk in "
          f"{len(info['shards'])} shards (largest {info['largest_shard_bytes'] / MIB:.0f} MiB); "
          f"LoRA r={LORA['r']} on {len(LORA['target_modules'])} projections per layer")
    print(f"median of {repeats} fresh processes; peak = VmHWM - VmRSS after imports")
    print(f"{'variant':<15}{'peak above baseline':>21}{'% of model':>12}{'wall s':>9}"
          f"{'near peak: anon + mmap (MiB)':>31}")
    for variant, s in summary.items():
        split = f"{s['anon_at_peak_mib']:.0f} + {s['file_at_peak_mib']:.0f}"
        print(f"{variant:<15}{s['peak_above_baseline_mib']:>17.0f} MiB{100 * s['fraction_of_model']:>11.1f}%"
              f"{s['seconds']:>9.1f}{split:>31}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_merge", help="cache for the model, run and outputs (default: /tmp/bench_merge)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per variant; the median is reported (default: 3)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rebuild", action="store_true", help="build the model and run directory again")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: one measured run
    args = parser.parse_args()
    work = Path(args.work).absolute()

    if args.child:
        info = json.loads((work / "setup.json").read_text())
        print(json.dumps(child(args.child, info, work / "out" / args.child)))
        return 0

    started = time.perf_counter()
    info = setup(work, args.rebuild)
    runs: dict[str, list[dict]] = {}
    for variant in args.variants:
        runs[variant] = []
        for i in range(args.repeats):
            r = measure(variant, info, work)
            runs[variant].append(r)
            print(f"  {variant:<14} run {i + 1}/{args.repeats}: {r['above_kib'] / 1024:7.0f} MiB above baseline, "
                  f"{r['seconds']:6.1f} s", flush=True)
        shutil.rmtree(work / "out" / variant, ignore_errors=True)  # 1+ GB each: do not leave them behind
    summary = summarize(runs, info["bytes"])
    print_table(info, summary, args.repeats)

    verdict = None
    if "streamed" in summary:
        frac = summary["streamed"]["fraction_of_model"]
        verdict = "PASS" if frac < TARGET else "FAIL"
        print(f"\n{verdict}: streamed merge peaks at {100 * frac:.1f}% of the model's size on disk "
              f"(target < {100 * TARGET:.0f}%)")
        if "streamed-mmap" in summary:
            kept = summary["streamed"]["peak_above_baseline_mib"] - summary["streamed-mmap"]["peak_above_baseline_mib"]
            print(f"of which ~{kept:.0f} MiB is freed memory glibc malloc kept resident (streamed - streamed-mmap)")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": info, "target_fraction": TARGET, "verdict": verdict, "summary": summary, "runs": runs,
            "repeats": args.repeats, "seconds": round(total, 1),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        }, indent=2) + "\n")
    return 0 if verdict != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
