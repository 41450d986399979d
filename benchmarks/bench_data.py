"""Benchmark the data pipeline: render, tokenize and mask (build_datasets), cold and cached.

    .venv/bin/python benchmarks/bench_data.py ../shared/data/alpaca_en_demo.json
    .venv/bin/python benchmarks/bench_data.py DATA.json --rows 5000 --repeats 1 --procs 1 2 --json out.json

The Alpaca rows are repeated to --rows (default 50,000) and written to a temporary .jsonl file, and
the tiny tokenizer (scripts/build_tiny.py) is used, so the numbers measure our pipeline rather than
a large tokenizer. Measured, with time.perf_counter around build_datasets only (not tokenizer load):
  - cold: cache off, for each --procs value (data.num_proc), in rows/s, as `qlora train` runs it for a
    recipe that does not pack (no packing figures: `qlora data` adds TRL's packing of every length,
    0.3 s at 20,000 rows, for its with/without comparison). Target: >= 5,000 rows/s on 2 cores;
  - cold again at the most processes with a Mistral/Llama 2-style tokenizer (sentencepiece_style:
    "▁" normalizer, BPE with byte fallback, 32k entries) trained on the same rows: the same pipeline
    with a tokenizer of the flagship recipe's family instead of the tiny byte-level one, trained on
    lines as SentencePiece trains (no entry holds a newline, as in Mistral's and Llama 2's);
  - cold again with the same layout trained on whole rows, which learns merges across the newline
    before each reply, so every row is tokenized a second time in pieces at the seam
    (data/tokenize.py): the seam policy's worst case. Each tokenizer's count of such rows is printed;
  - cold again with a real tokenizer (--tokenizer, default ../shared/tokenizers/mistral-v1, Mistral
    v0.2's 32k SentencePiece vocabulary) where it exists;
  - cache miss: a cold run that also stores the result in the cache;
  - cache hit, in this process and in a fresh one (python -c). Target: < 2 s;
  - the tokenizer alone on 5,000 rendered rows, in CPU seconds: the tiny tokenizer, the Mistral-style
    one, and byte-level BPEs trained on the same rows with up to 8k and 32k entries (a realistic
    number of tokens per row; the rows hold fewer distinct pairs than 32k, so the larger learns
    fewer: see "vocab");
  - the ceiling, for each of those tokenizers: rows/s of the tokenizer alone
    (encode_batch with offsets, in batches of the pipeline map's MAP_BATCH rows) on all --rows rows as the
    pipeline renders them, in the same number of processes (forked, started before the clock), run
    alternately with the cold pipeline run; the pipeline's rows/s over it is the "ratio" (of the
    medians), and "paired" is the median of each run's ratio to the tokenizer-alone run right after it;
  - peak RSS of build_datasets as `qlora data` runs it (cache on, a miss: build and store, with the
    packing figures) in a fresh
    process, at each of --rss-rows (default 20,000 and 1,000,000): the process's own peak (VmHWM)
    and the peak of it and its map workers together, and the ratio of the largest size to the smallest (target <= 1.5). A smaller
    pair (--rss-rows 20000 200000) is a quicker check; --rss-rows with no value skips it.
Both caches live in a temporary directory: QLORA_CACHE_DIR (ours) and HF_DATASETS_CACHE (the Arrow
copy `datasets` makes of each JSON file). Both are emptied before every cold run, so "cold" means
what a first run sees, and your own caches are never read or written.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora_cli.data.pipeline import MAP_BATCH  # rows per encode_batch call, as the pipeline's map (no `datasets` import)

HERE = Path(__file__).resolve().parent
TARGET_ROWS_PER_S, TARGET_HIT_S = 5000, 2.0
TARGET_CEILING_RATIO, TARGET_RSS_RATIO = 0.7, 1.5

# Peak RSS of one cold build, as `qlora data` runs it (cache on: built, then stored), in a fresh
# interpreter so nothing earlier in this process counts. The process's own peak is its VmHWM (kept
# by the kernel, reset by exec; ru_maxrss is not: a child inherits its parent's). The map's worker
# processes come and go, so the whole tree (the process and every descendant, summed) is sampled
# every 20 ms; its peak can miss a spike shorter than that.
PEAK_RSS = """
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import bench_data
from qlora_cli.data.pipeline import build_datasets

def kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0

def tree(pid):
    try:
        kids = [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        kids = []
    return [pid] + [p for k in kids for p in tree(k)]

tree_peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        tree_peak[0] = max(tree_peak[0], sum(kb(p, "VmRSS") for p in tree(os.getpid())))
        time.sleep(0.02)

a = json.loads(sys.argv[2])
tokenizer, template = bench_data.load(a["model"])
data = bench_data.data_section(a["data"], a["procs"], cache=True)
before = kb("self", "VmRSS")
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
p = build_datasets(data, tokenizer, template, seed=0, use_cache=True, packing_figures=True)
seconds = time.perf_counter() - t0
done.set()
print(json.dumps({"seconds": seconds, "rows": p.stats.train_rows, "truncated": p.stats.truncated,
                  "train_tokens": p.stats.train_tokens, "trained_tokens": p.stats.trained_tokens,
                  "before_build_mb": before / 1024, "peak_mb": kb("self", "VmHWM") / 1024,
                  "tree_peak_mb": tree_peak[0] / 1024}))
"""

# Run in a fresh interpreter: a cache hit as `qlora train` sees it, with nothing imported or warm
# (the import of `datasets` and the OS page cache state are part of what a user waits for).
FRESH_HIT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import bench_data
from qlora_cli.data.pipeline import build_datasets
a = json.loads(sys.argv[2])
tokenizer, template = bench_data.load(a["model"])
data = bench_data.data_section(a["data"], a["procs"], cache=True)
t0 = time.perf_counter()
p = build_datasets(data, tokenizer, template, seed=0, use_cache=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "cache": p.stats.cache}))
"""


def load(model_dir: str):
    """The tokenizer with the alpaca template installed, as `qlora train` prepares it."""
    from qlora_cli.recipe.schema import ModelSection
    from qlora_cli.data.templates import apply_template, resolve_template
    from qlora_cli.model.load import load_tokenizer

    tokenizer = load_tokenizer(ModelSection(name_or_path=model_dir))
    template = resolve_template("alpaca", tokenizer)
    apply_template(template, tokenizer)
    return tokenizer, template


def data_section(path: str, procs: int, cache: bool):
    from qlora_cli.recipe.schema import DataSection

    return DataSection(sources=[{"path": path, "format": "alpaca"}], num_proc=procs, cache=cache)


def replicate(src: Path, rows: int, out: Path) -> None:
    """The source rows (a JSON array or JSON lines) repeated in order to exactly `rows` lines."""
    text = src.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        base = json.loads(text)
    else:
        base = [json.loads(line) for line in text.splitlines() if line.strip()]
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in base]
    with out.open("w", encoding="utf-8") as f:
        f.writelines(lines[i % len(lines)] for i in range(rows))


def rendered_rows(rows_file: Path, tokenizer, template, n: int = 5000) -> list[str]:
    """The first n rows as the pipeline renders them (Alpaca template), for the tokenizer-only figures."""
    from qlora_cli.data.formats import to_canonical
    from qlora_cli.data.templates import Renderer

    renderer = Renderer(template, tokenizer)
    lines = rows_file.read_text(encoding="utf-8").splitlines()[:n]
    return [renderer.examples(to_canonical(json.loads(line), "alpaca", {})["messages"])[0][0] for line in lines]


_ALONE: dict = {}  # what forked workers of tokenizer_alone read: the texts and the Rust tokenizer


def _encode_share(bounds: tuple[int, int]) -> float:
    """CPU seconds (all threads) to encode texts[bounds[0]:bounds[1]]."""
    texts, backend = _ALONE["texts"], _ALONE["backend"]
    t0 = time.process_time()
    for start in range(bounds[0], bounds[1], MAP_BATCH):
        backend.encode_batch(texts[start : min(start + MAP_BATCH, bounds[1])], add_special_tokens=False)
    return time.process_time() - t0


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have ended (the map's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _started(_) -> int:
    return os.getpid()


def tokenizer_alone(texts: list[str], tokenizer, procs: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) the Rust tokenizer alone takes on TEXTS in PROCS processes: the ceiling.

    Each process encodes a contiguous share in batches of MAP_BATCH, with offsets (encode_batch always
    computes them; the masks need them) and without special tokens, as the pipeline does. The
    processes are forked and started before the clock starts, and the texts are inherited, not sent:
    only the tokenizer's own work is timed, so no pipeline in as many processes can beat it.
    """
    _ALONE.update(texts=texts, backend=tokenizer.backend_tokenizer)
    n = len(texts)
    if procs == 1:
        t0 = time.perf_counter()
        cpu = _encode_share((0, n))
        return time.perf_counter() - t0, cpu
    shares = [(n * i // procs, n * (i + 1) // procs) for i in range(procs)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        while len(set(pool.map(_started, range(4 * procs), chunksize=1))) < procs:
            pass  # every worker up
        t0 = time.perf_counter()
        cpu = sum(pool.map(_encode_share, shares, chunksize=1))
        seconds = time.perf_counter() - t0
    return seconds, cpu


def peak_rss(model_dir: str, rows_file: Path, procs: int) -> dict:
    child = json.dumps({"model": model_dir, "data": str(rows_file), "procs": procs})
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(HERE), child], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"peak RSS run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def straddled_rows(rows_file: Path, tokenizer, template, n: int = 2000) -> str:
    """How many of the first n rows have a token across a reply's start, which data/tokenize.py then
    tokenizes again in pieces (prompt, reply): "k of n"."""
    from qlora_cli.data.tokenize import _straddles

    texts_spans = [_one_example(line, tokenizer, template) for line in rows_file.read_text(encoding="utf-8").splitlines()[:n]]
    encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _ in texts_spans], add_special_tokens=False)
    k = sum(any(_straddles(e, c) for span in spans for c in span if 0 < c < len(text))
            for e, (text, spans) in zip(encodings, texts_spans))
    return f"{k} of {len(texts_spans)}"


def _one_example(line: str, tokenizer, template):
    from qlora_cli.data.formats import to_canonical
    from qlora_cli.data.templates import Renderer

    return Renderer(template, tokenizer).examples(to_canonical(json.loads(line), "alpaca", {})["messages"])[0]


def sentencepiece_style(texts: list[str], out: Path, vocab: int = 32000, lines: bool = True) -> str:
    """A tokenizer laid out like Mistral's and Llama 2's (the flagship recipe's family), trained on texts.

    Their tokenizer.json: spaces become "▁" and one is prepended (a normalizer), no pre-tokenizer,
    a BPE with byte fallback, <unk>/<s>/</s>. The BPE is trained with a Metaspace pre-tokenizer (a
    word at a time, which is what SentencePiece learns too) and then used in that layout. Saved to
    `out` so it loads the way `qlora train` loads any tokenizer. Returns the directory.

    lines=True trains on the texts' lines, as SentencePiece's trainer reads its corpus a sentence per
    line: no entry then holds a newline, which becomes the byte token <0x0A> (Mistral v0.2's and
    Llama 2's vocabularies hold no entry with a newline). lines=False trains on whole texts, which
    learns merges across the newline before each reply ("\nThe"): not a real vocabulary's shape, but
    the worst case of the seam policy (data/tokenize.py), which then tokenizes every row twice.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    corpus = (line for text in texts for line in text.split("\n")) if lines else texts
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special, initial_alphabet=[f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    return str(out)


def tokenizer_cost(texts: list[str], tokenizers: dict, repeats: int = 3) -> dict:
    """CPU seconds each Rust tokenizer alone spends on the rendered rows (with the offsets masks
    need): the tiny one, byte-level BPEs of realistic vocabulary trained on the same rows, and the
    Mistral-style one.

    This is the floor under the whole pipeline: on C cores no pipeline that tokenizes can beat
    C x n / cpu_s rows per second.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    def cost(backend) -> dict:
        seconds = []
        for _ in range(repeats):
            t0 = time.process_time()  # CPU time of every thread: the tokenizer may use several
            encodings = backend.encode_batch(texts, add_special_tokens=False)
            seconds.append(time.process_time() - t0)
        return {"cpu_s": statistics.median(seconds), "tokens_per_row": sum(len(e.ids) for e in encodings) / len(texts),
                "vocab": backend.get_vocab_size()}

    out = {"rows": len(texts)}
    for name, tokenizer in tokenizers.items():
        out[name] = cost(tokenizer.backend_tokenizer)
    for vocab in (8192, 32000):
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        out[f"byte_level_bpe_{vocab}"] = cost(bpe)
    return out


def clear(*dirs: Path) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def summary(values: list[float]) -> dict:
    # Medians, not means: on a shared machine one run can be slowed by another process, and a
    # median of a few runs ignores such an outlier where a mean would not.
    return {"median": statistics.median(values), "values": [round(v, 4) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default="../shared/data/alpaca_en_demo.json", help="Alpaca JSON/JSONL file")
    ap.add_argument("--rows", type=int, default=50_000, help="rows after replication (default 50000)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="data.num_proc values (default 1 2)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (default 3)")
    ap.add_argument("--tiny", help="an existing build_tiny.py output directory (default: build one)")
    ap.add_argument("--rss-rows", type=int, nargs="*", default=[20_000, 1_000_000],
                    help="row counts for the peak-RSS runs (default 20000 1000000; none: skip them)")
    ap.add_argument("--tokenizer", default="../shared/tokenizers/mistral-v1",
                    help="a real tokenizer directory, run cold beside the others (default: Mistral v0.2's, where "
                         "../shared has it; skipped when the directory does not exist)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data."))
    ours, hf = tmp / "qlora_cache", tmp / "hf_datasets"
    # Set before `datasets` is imported (it reads HF_DATASETS_CACHE once); the fresh process inherits them.
    os.environ.update(QLORA_CACHE_DIR=str(ours), HF_DATASETS_CACHE=str(hf), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    try:
        if args.tiny:
            model_dir = str(Path(args.tiny) / "model")
        else:
            sys.path.insert(0, str(HERE.parent / "scripts"))
            import build_tiny

            model_dir = str(build_tiny.build(tmp / "tiny") / "model")
        rows_file = tmp / "rows.jsonl"
        replicate(Path(args.data), args.rows, rows_file)

        import datasets
        import tokenizers
        import transformers

        from qlora_cli.data.pipeline import build_datasets

        tokenizer, template = load(model_dir)

        def timed(procs: int, use_cache: bool, tok=tokenizer, tpl=template):
            data = data_section(str(rows_file), procs, cache=use_cache)
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            prepared = build_datasets(data, tok, tpl, seed=0, use_cache=use_cache)
            timed.cpu = cpu_seconds() - cpu0
            return time.perf_counter() - t0, prepared.stats

        def warm_up(tok, tpl):
            # One untimed run on a small file first: the first call pays one-off costs (imports of the
            # json reader and trl, template compilation) that would otherwise be charged to --procs[0].
            build_datasets(data_section(str(tmp / "warmup.jsonl"), 1, False), tok, tpl, seed=0, use_cache=False)

        def cold(procs_list, tok=tokenizer, tpl=template) -> dict:
            # Each pipeline run is followed by the tokenizer alone on the same rows in as many
            # processes (the ceiling), so that load from others on a shared machine hits both alike.
            texts = rendered_rows(rows_file, tok, tpl, args.rows)
            out = {}
            for procs in procs_list:
                times, alone, cpu, alone_cpu = [], [], [], []
                for _ in range(args.repeats):
                    clear(ours, hf)
                    seconds, stats = timed(procs, use_cache=False, tok=tok, tpl=tpl)
                    times.append(seconds)
                    cpu.append(timed.cpu)
                    wall, used = tokenizer_alone(texts, tok, procs)
                    alone.append(wall)
                    alone_cpu.append(used)
                # every row must survive, or the rows/s would flatter a pipeline that drops rows
                assert stats.train_rows == args.rows, f"{stats.train_rows} of {args.rows} rows kept"
                s = summary(times)
                s["rows_per_s"] = args.rows / s["median"]
                s["truncated"] = stats.truncated
                s["tokenizer_alone_s"] = summary(alone)
                s["ceiling_rows_per_s"] = args.rows / s["tokenizer_alone_s"]["median"]
                s["ratio"] = s["rows_per_s"] / s["ceiling_rows_per_s"]
                # Each pipeline run over the tokenizer-alone run right after it, then their median: the
                # machine's speed drifts by tens of percent within a run, and a pair is seconds apart.
                s["paired_ratio"] = statistics.median(a / t for a, t in zip(alone, times))
                # The same in CPU seconds, which load from other processes on a shared machine barely moves.
                s["cpu_s"], s["tokenizer_alone_cpu_s"] = summary(cpu), summary(alone_cpu)
                s["cpu_ratio"] = s["tokenizer_alone_cpu_s"]["median"] / s["cpu_s"]["median"]
                out[procs] = s
            return out

        replicate(Path(args.data), min(args.rows, 1000), tmp / "warmup.jsonl")
        warm_up(tokenizer, template)
        results = {"rows": args.rows, "data": str(args.data), "repeats": args.repeats}
        results["cold"] = cold(args.procs)

        # The same cold run with a tokenizer of the flagship recipe's family (Mistral / Llama 2
        # layout) trained on these rows: what the pipeline does when the tokenizer is a real one's shape.
        texts = rendered_rows(rows_file, tokenizer, template, 5000)
        sp_tokenizer, sp_template = load(sentencepiece_style(texts, tmp / "sentencepiece"))
        warm_up(sp_tokenizer, sp_template)
        results["cold_sentencepiece"] = cold([max(args.procs)], sp_tokenizer, sp_template)
        results["sentencepiece_straddled_rows"] = straddled_rows(rows_file, sp_tokenizer, sp_template)
        # The seam policy's worst case: the same layout trained on whole texts, which learns merges
        # across the newline before each reply ("\nThe" as one token), so every row is tokenized
        # again in pieces at the seam (data/tokenize.py). No real SentencePiece vocabulary does this.
        nl_tokenizer, nl_template = load(sentencepiece_style(texts, tmp / "newline_merging", lines=False))
        warm_up(nl_tokenizer, nl_template)
        results["cold_newline_merging"] = cold([max(args.procs)], nl_tokenizer, nl_template)
        results["newline_merging_straddled_rows"] = straddled_rows(rows_file, nl_tokenizer, nl_template)
        # A real tokenizer of that family.
        if args.tokenizer and Path(args.tokenizer, "tokenizer.json").exists():
            real_tokenizer, real_template = load(args.tokenizer)
            warm_up(real_tokenizer, real_template)
            results["cold_real"] = cold([max(args.procs)], real_tokenizer, real_template)
            results["cold_real"]["tokenizer"] = args.tokenizer
            results["real_straddled_rows"] = straddled_rows(rows_file, real_tokenizer, real_template)
        elif args.tokenizer:
            print(f"--tokenizer {args.tokenizer}: no tokenizer.json there, so no real tokenizer is measured",
                  file=sys.stderr)

        # Cache miss then hits, with the most processes asked for (num_proc is not part of the cache key).
        procs = max(args.procs)
        misses = []
        for _ in range(args.repeats):
            clear(ours, hf)
            seconds, stats = timed(procs, use_cache=True)
            assert stats.cache == "miss", stats.cache
            misses.append(seconds)
        hits = []
        for _ in range(args.repeats):
            seconds, stats = timed(procs, use_cache=True)
            assert stats.cache == "hit", stats.cache
            hits.append(seconds)
        fresh, fresh_wall = [], []
        child = json.dumps({"model": model_dir, "data": str(rows_file), "procs": procs})
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", FRESH_HIT, str(HERE), child],
                                 capture_output=True, text=True, check=True)
            fresh_wall.append(time.perf_counter() - t0)
            report = json.loads(out.stdout.strip().splitlines()[-1])
            assert report["cache"] == "hit", report
            fresh.append(report["seconds"])
        results["cache"] = {"procs": procs, "miss_s": summary(misses), "hit_s": summary(hits),
                            "fresh_hit_s": summary(fresh), "fresh_process_wall_s": summary(fresh_wall)}
        results["tokenizer_alone"] = tokenizer_cost(texts, {"tiny": tokenizer, "sentencepiece_bpe_32000": sp_tokenizer,
                                                            "newline_merging_32000": nl_tokenizer})
        # Peak memory at two sizes, each in a fresh process, cold (both caches emptied first).
        results["peak_rss"] = {}
        for n in args.rss_rows or []:
            clear(ours, hf)
            big = tmp / f"rss_{n}.jsonl"
            replicate(Path(args.data), n, big)
            results["peak_rss"][n] = peak_rss(model_dir, big, max(args.procs))
            big.unlink()
        clear(ours, hf)
        results["machine"] = {
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
        }
    finally:
        clear(tmp)

    m = results["machine"]
    print(f"{args.rows} rows of {args.data}; {m['cpu_count']} CPUs, {m['platform']}")
    print(f"datasets {m['datasets']}, tokenizers {m['tokenizers']}, transformers {m['transformers']}")
    print(f"\n{'cold, cache off':<26}{'median s':>10}{'rows/s':>10}{'ceiling':>10}{'ratio':>7}{'paired':>8}"
          "   all runs (s)")
    colds = [("", "cold"), (", Mistral-style", "cold_sentencepiece"), (", newline-merging", "cold_newline_merging")] + (
        [(", " + Path(results["cold_real"]["tokenizer"]).name, "cold_real")] if "cold_real" in results else [])
    for label, key in colds:
        for procs, s in results[key].items():
            if procs == "tokenizer":
                continue
            ok = "ok" if s["rows_per_s"] >= TARGET_ROWS_PER_S else f"below {TARGET_ROWS_PER_S}"
            ok += "; ratio " + ("ok" if s["ratio"] >= TARGET_CEILING_RATIO else f"below {TARGET_CEILING_RATIO}")
            print(f"{f'num_proc={procs}{label}':<26}{s['median']:>10.3f}{s['rows_per_s']:>10.0f}"
                  f"{s['ceiling_rows_per_s']:>10.0f}{s['ratio']:>7.2f}{s['paired_ratio']:>8.2f}   {s['values']} {ok}")
    print("in CPU seconds, tokenizer alone / pipeline: " + "; ".join(
        f"{key} {procs}: {s['tokenizer_alone_cpu_s']['median']:.2f} / {s['cpu_s']['median']:.2f} = {s['cpu_ratio']:.2f}"
        for _, key in colds for procs, s in results[key].items() if procs != "tokenizer"))
    print("rows tokenized again in pieces at the seam: " + "; ".join(
        f"{name} {results[key]}" for name, key in [("Mistral-style", "sentencepiece_straddled_rows"),
                                                  ("newline-merging", "newline_merging_straddled_rows"),
                                                  ("real", "real_straddled_rows")] if key in results))
    print("ceiling: the tokenizer alone on the same rendered rows in as many processes; tokenizer-alone runs (s): "
          + "; ".join(f"{key} {procs}: {s['tokenizer_alone_s']['values']}"
                      for _, key in colds for procs, s in results[key].items() if procs != "tokenizer"))
    c = results["cache"]
    cache_label = f"cache (num_proc={c['procs']})"
    print(f"\n{cache_label:<26}{'median s':>10}{'':>10}   all runs (s)")
    for label, name in [("miss (build + store)", "miss_s"), ("hit, same process", "hit_s"),
                        ("hit, fresh process", "fresh_hit_s"), ("fresh process, wall", "fresh_process_wall_s")]:
        flag = "" if name in ("miss_s", "fresh_process_wall_s") else (
            " ok" if c[name]["median"] < TARGET_HIT_S else f" above {TARGET_HIT_S} s")
        print(f"{label:<26}{c[name]['median']:>10.3f}{'':>10}   {c[name]['values']}{flag}")
    t = results["tokenizer_alone"]
    print(f"\ntokenizer alone, {t['rows']} rendered rows   vocab   CPU s   tokens/row   ceiling rows/s on {m['cpu_count']} cores")
    for name, v in t.items():
        if name != "rows":
            ceiling = m["cpu_count"] * t["rows"] / v["cpu_s"]
            print(f"{name:<30}{v['vocab']:>8}{v['cpu_s']:>8.3f}{v['tokens_per_row']:>13.0f}{ceiling:>12.0f}")
    rss = results["peak_rss"]
    if rss:
        print(f"\npeak RSS, build_datasets cold with cache store, fresh process, num_proc={max(args.procs)}")
        print(f"{'rows':>10}{'s':>8}{'rows/s':>9}{'before MB':>11}{'peak MB':>9}{'tree MB':>9}   "
              "train_tokens / trained_tokens / truncated")
        for n, r in rss.items():
            print(f"{n:>10}{r['seconds']:>8.1f}{n / r['seconds']:>9.0f}{r['before_build_mb']:>11.0f}{r['peak_mb']:>9.0f}"
                  f"{r['tree_peak_mb']:>9.0f}   {r['train_tokens']} / {r['trained_tokens']} / {r['truncated']}")
        if len(rss) > 1:
            lo, hi = rss[min(rss)], rss[max(rss)]
            ratio = hi["peak_mb"] / lo["peak_mb"]
            results["peak_rss_ratio"] = ratio
            ok = "ok" if ratio <= TARGET_RSS_RATIO else f"above {TARGET_RSS_RATIO}"
            print(f"peak RSS at {max(rss)} rows / at {min(rss)} rows: {ratio:.2f} ({ok}); "
                  f"the process with its workers: {hi['tree_peak_mb'] / lo['tree_peak_mb']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
