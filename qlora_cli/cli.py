"""The `qlora` command line. Each command loads the recipe and calls one function.

torch, transformers and friends are imported inside the commands, so `qlora --help` and
`qlora schema` start instantly.

Exit codes: 0 success, 2 bad input (recipe, data, path, flag; printed without a traceback),
1 an unexpected internal error (printed with its traceback: it is a bug worth reporting).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import traceback
from contextlib import contextmanager
from typing import List, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape

from qlora_cli.errors import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, NothingToDo, StoppedRun, UserError
from qlora_cli.model.remote_code import (
    FLAG_HELP as REMOTE_CODE_HELP_TEXT,  # a light module: --help stays instant
)
from qlora_cli.export.llama_cpp import CONVERTER_TYPES, QUANTIZE_TYPES
from qlora_cli.recipe.starter import FORMATS as STARTER_FORMATS

app = typer.Typer(
    name="qlora",
    help="Fine-tune causal language models with QLoRA (4-bit NF4 base + LoRA adapters) from one YAML recipe.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

RESUME_LATEST = "latest"  # what a bare --resume means (see main)
StarterFormat = Literal[STARTER_FORMATS]  # `qlora init --format`: one per starter recipe
ExportQuant = Literal[CONVERTER_TYPES + QUANTIZE_TYPES]  # `qlora export --quant`: llama.cpp's names, lower case
SET_HELP = "Override a recipe key, e.g. --set lora.r=8 --set data.sources[0].path=x.jsonl (repeatable)."


@app.command()
def train(
    recipe: str = typer.Argument(..., help="Path to the YAML recipe."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Run directory (overrides output.dir)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing non-empty run directory."),
    resume: Optional[str] = typer.Option(
        None, "--resume",
        help="Continue the run in the run directory: alone, from its newest whole checkpoint; or --resume PATH "
        "(a checkpoint-N directory, or the run directory).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display: print only the final summary."),
    log_format: Literal["rich", "json"] = typer.Option(
        "rich", "--log-format", help="rich (live display) or json (one JSON object per log line on stdout, for scripts)."
    ),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1,
        help="Train in N processes on this machine (one per GPU, or N CPU processes), launched through "
        "accelerate. The recipe's distributed section picks DDP, FSDP or DeepSpeed.",
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Quantize the base model to 4 bits, attach LoRA, train, and write a run directory."""
    from pathlib import Path

    from qlora_cli.model.remote_code import require_consent
    from qlora_cli.outputs.run_dir import RECIPE, RunDir
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.train.preflight import check_inputs, preflight, with_output_dir

    if resume is not None and overwrite:
        raise UserError.single("--resume", "--resume continues a run and --overwrite replaces it: give one of them")
    if resume not in (None, RESUME_LATEST) and (Path(resume).expanduser() / RECIPE).is_file():
        if output_dir is not None and Path(output_dir).resolve() != Path(resume).expanduser().resolve():
            raise UserError.single("--resume", f"{resume} is a run directory, but --output-dir names {output_dir}")
        output_dir, resume = resume, RESUME_LATEST  # --resume RUN_DIR: that run, from its newest checkpoint
    # What to type to continue, or to see the memory: with this run's overrides, quoted for a shell.
    overrides = [arg for s in set_ or [] for arg in ("--set", s)]
    command = shlex.join(["qlora", "train", recipe, *overrides, *(["--output-dir", output_dir] if output_dir else []),
                          "--resume"])
    recipe_obj = load_recipe(recipe, set_ or [])
    require_consent(recipe_obj.model, trust_remote_code)
    # The recipe and every path are checked before torch and transformers load (seconds): a typo
    # or a wrong path is reported at once. Silently and without hashing checkpoints: training runs
    # the same checks again in full, and warns.
    checked = with_output_dir(recipe_obj, output_dir)
    run = RunDir(checked.output.dir)
    check_inputs(checked, run, overwrite, resume, warn=lambda text: None, hashes=False, recipe_file=recipe)
    display = "json" if log_format == "json" else ("quiet" if quiet else "rich")
    with _loading_status(display == "rich" and os.environ.get("RANK", "0") == "0") as phase:
        _quiet_libraries()
        if nproc is not None and nproc > 1 and "WORLD_SIZE" not in os.environ:
            # Check everything that needs no model before starting N processes, so a bad recipe or
            # path is reported once, plainly, instead of by every rank and then by the launcher.
            from qlora_cli.train.distributed import launch

            args = [recipe, *overrides, *(["--output-dir", output_dir] if output_dir else []),
                    *(["--overwrite"] if overwrite else []), *(["--resume", resume] if resume else []),
                    *(["--quiet"] if quiet else []), *(["--trust-remote-code"] if trust_remote_code else []),
                    "--log-format", log_format]
            with run.lock():  # this process writes nothing, but holds the run for the ones it launches
                preflight(checked, run, overwrite, resume, warn=lambda text: None)
                phase(None)  # the launched processes print for themselves
                raise typer.Exit(launch(nproc, args))
        from qlora_cli.train.run import train as run_training

        result = run_training(recipe_obj, output_dir=output_dir, overwrite=overwrite, resume=resume,
                              resume_command=command, console=err, display=display,
                              estimate_command=shlex.join(["qlora", "estimate", recipe, *overrides]), phase=phase)
    s = result.summary
    if not s:  # a non-zero rank of a distributed run: rank 0 reports
        return
    if display == "json":
        typer.echo(json.dumps({"event": "done", "run_dir": str(result.run_dir.path), "summary": s}, default=str))
        return
    from qlora_cli.train.end_panel import render_summary_panel

    err.print(render_summary_panel(s, recipe_obj, str(result.run_dir.path)))
    typer.echo(str(result.run_dir.path))


@contextmanager
def _loading_status(show: bool):
    """A spinner on the terminal from the moment the recipe checks out until training starts, naming
    what is being loaded: importing torch, transformers, PEFT and TRL, tokenizing and quantizing take
    seconds to minutes before the first line that train.run prints. Yields `phase(text)`, which
    names the next step; phase(None) ends the spinner (train.run calls it before its own display).
    Nothing is shown off a terminal, with --quiet or --log-format json, or on a rank other than 0."""
    if not show:
        yield lambda text: None
        return
    status = err.status("loading torch, transformers, PEFT and TRL", spinner="dots")
    status.start()
    try:
        # Naming the spinner again is what makes rich draw the new text at once: otherwise it waits
        # for its refresh thread, which a step holding the GIL (loading a tokenizer) can starve.
        yield lambda text: status.update(text, spinner="dots") if text else status.stop()
    finally:
        status.stop()


@app.command()
def validate(
    recipe: str = typer.Argument(..., help="Path to the YAML recipe."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the check; do not print the resolved recipe."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Check a recipe without training: schema, paths, tokenizer, template and every data row; print it resolved."""
    r = _checked_recipe(recipe, set_, trust_remote_code)
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.data.report import data_warnings
    from qlora_cli.model.architectures import check_model
    from qlora_cli.model.tokenizer import prepare_tokenizer

    tokenizer, template = prepare_tokenizer(r)
    _, coverage = check_model(r, tokenizer)  # 4-bit coverage and vocabulary, on an empty model
    if r.train.method != "sft":  # DPO, ORPO, KTO pairs (data/preference_report.py)
        from qlora_cli.data.preference_report import validate_line

        line, warnings = validate_line(r, tokenizer, template, recipe)
        err.print(f"[green]ok[/] {escape(recipe)}: {coverage.fraction:.1%} of the model's block weights in 4 bits, "
                  f"{line}", soft_wrap=True)
    else:
        stats = build_datasets(r.data, tokenizer, template, seed=r.train.seed, batch_size=r.train.batch_size).stats
        err.print(
            f"[green]ok[/] {escape(recipe)}: {coverage.fraction:.1%} of the model's block weights in 4 bits, "
            f"{stats.train_rows} train rows, {stats.val_rows} validation rows, "
            f"template {template.name if template else 'none (text)'}, "
            + (f"{stats.split_documents} split into {r.data.max_seq_len}-token blocks, "
               if r.data.on_too_long == "split" else f"{stats.truncated} truncated to max_seq_len={r.data.max_seq_len}, ")
            + f"{stats.dropped_too_long + stats.dropped_no_response} dropped, {stats.bad_rows} bad rows skipped",
            soft_wrap=True,
        )
        warnings = data_warnings(stats)
    for line in warnings:
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    from qlora_cli.train.preflight import optimizer_note, precision_note

    for note in (precision_note(r), optimizer_note(r)):  # what the run really computes with
        if note:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if not quiet:
        # The fully resolved recipe (defaults, overrides and all) on stdout: what `train` would run.
        typer.echo(r.to_yaml(), nl=False)


@app.command()
def data(
    recipe: str = typer.Argument(..., help="Path to the YAML recipe."),
    n: int = typer.Option(3, "--n", min=0, help="How many rendered training examples to show."),
    stats: bool = typer.Option(False, "--stats", help="Show the full statistics table and length histogram."),
    as_json: bool = typer.Option(False, "--json", help="Print examples and statistics as JSON on stdout."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Preview the training data: rendered examples with trained tokens highlighted, and statistics."""
    r = _checked_recipe(recipe, set_, trust_remote_code)
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.data.report import (
        data_warnings,
        example_segments,
        render_example,
        render_stats,
    )
    from qlora_cli.model.tokenizer import prepare_tokenizer

    tokenizer, template = prepare_tokenizer(r)
    if r.train.method != "sft":  # pairs, chosen and rejected each with its scored tokens marked
        from qlora_cli.data.preference_report import show_data

        return show_data(r, tokenizer, template, n, as_json, err, typer.echo)
    # With packing's figures whether or not the recipe packs: the preview compares the two.
    prepared = build_datasets(r.data, tokenizer, template, seed=r.train.seed, batch_size=r.train.batch_size,
                              packing_figures=True)
    examples = example_segments(prepared.train, tokenizer, n, r.data.split_block)
    files = [s.files for s in prepared.stats.sources]
    for ex in examples:
        ex["file"] = files[ex["source"]][ex["file"]]
    for line in data_warnings(prepared.stats):
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if as_json:
        out = {"template": template.name if template else None, "examples": examples, "stats": prepared.stats.to_dict()}
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    out = Console(highlight=False, soft_wrap=True)
    out.print(
        f"[bold]{len(examples)} of {prepared.stats.train_rows} training examples[/], template "
        f"{escape(template.name) if template else 'none (text)'}: "
        f"[bold green]trained tokens[/] are bright, [dim]masked tokens[/] are dim\n"
    )
    for ex in examples:
        label = "line" if ex["file"].endswith((".jsonl", ".txt")) else "row"
        out.print(render_example(ex, f"{ex['file']} {label} {ex['row']}"))
    if stats:
        out.print(render_stats(prepared.stats, r.data))
    else:
        st = prepared.stats
        out.print(
            f"{st.train_rows} train / {st.val_rows} validation rows, {st.train_tokens:,} tokens per epoch, "
            f"{st.truncated} truncated, {st.dropped_too_long + st.dropped_no_response} dropped, "
            f"{st.bad_rows} bad rows skipped (--stats for more)"
        )


@app.command()
def merge(
    run_dir: str = typer.Argument(..., help="The run directory `qlora train` wrote."),
    output: Optional[str] = typer.Option(None, "--output", help="Where to write the model (default: RUN_DIR/merged)."),
    base: Literal["dequantized", "original"] = typer.Option(
        "dequantized", "--base",
        help="Add the update to the NF4-dequantized weights the adapter was trained against (dequantized), "
        "or to the original checkpoint weights (original).",
    ),
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = typer.Option(
        None, "--dtype", help="The merged weights' dtype (default: the recipe's model.dtype)."
    ),
    max_shard_size: Optional[str] = typer.Option(
        None, "--max-shard-size",
        help="e.g. 2GB (a bare number is bytes, as in transformers); default: the output's shards mirror the base model's."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier merged model at --output."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the fidelity check against the adapter model."),
    compare: bool = typer.Option(False, "--compare", help="Also merge with the other --base in memory and report both."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Fold the adapter into the base model and write a standalone model, with a fidelity report."""
    _quiet_libraries()  # first, so no library this command loads logs its import-time notices
    from qlora_cli.merge.fidelity import render_fidelity
    from qlora_cli.merge.run import merge as run_merge

    start = time.perf_counter()
    result = run_merge(
        run_dir, output=output, base_mode=base, dtype=dtype, max_shard_size=max_shard_size,
        overwrite=overwrite, verify=not no_verify, compare=compare, console=err, trust_remote_code=trust_remote_code,
    )
    if "fidelity" in result.report:
        err.print(render_fidelity(result.report))
    err.print(f"[green]done[/] merged model in {escape(str(result.output))} ({time.perf_counter() - start:.1f}s)")
    typer.echo(str(result.output))


@app.command()
def export(
    target: str = typer.Argument(..., help="A run directory (merged first if it has no merged model) or a merged model directory."),
    fmt: Literal["gguf", "ollama"] = typer.Option("gguf", "--format", help="gguf: one GGUF file; ollama: the GGUF and a Modelfile."),
    quant: ExportQuant = typer.Option(
        "q8_0", "--quant", help="GGUF type: f32, f16, bf16, q8_0 (llama.cpp's converter) or a k-quant such as q4_k_m (llama-quantize)."
    ),
    output: Optional[str] = typer.Option(None, "--output", help="Folder to write (default: RUN/gguf-QUANT or RUN/ollama-QUANT)."),
    llama_cpp: Optional[str] = typer.Option(
        None, "--llama-cpp", help="llama.cpp's source tree (its converter); default $QLORA_LLAMA_CPP, then ./llama.cpp."
    ),
    llama_cpp_bin: Optional[str] = typer.Option(
        None, "--llama-cpp-bin", help="Its built programs; default $QLORA_LLAMA_CPP_BIN, then LLAMA_CPP/build/bin, LLAMA_CPP/bin, $PATH."
    ),
    pre_tokenizer: Optional[str] = typer.Option(
        None, "--pre-tokenizer", help="For a BPE tokenizer llama.cpp does not know: the known one it splits text like (e.g. gpt-2)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export at --output."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the check against the merged model."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Write the run as a GGUF (llama.cpp, LM Studio) or an Ollama model, and check it answers like the merged model."""
    _quiet_libraries()  # first, so no library this command loads logs its import-time notices
    from qlora_cli.export.run import export as run_export, render_check, verdict

    report = run_export(target, fmt=fmt, quant=quant, output=output, llama_cpp=llama_cpp, llama_cpp_bin=llama_cpp_bin,
                        pre_tokenizer=pre_tokenizer, overwrite=overwrite, verify=not no_verify, console=err, trust_remote_code=trust_remote_code)
    if report.get("check") and "rows" in report["check"]:
        err.print(render_check(report))
    line, bad = verdict(report)
    err.print(f"[{'red' if bad else 'green'}]{'warning' if bad else 'done'}:[/] {escape(line)}")
    err.print(f"[dim]wrote {escape(report['output'])}: {', '.join(report['files'])} ({report['seconds']:.1f}s)[/]")
    typer.echo(report["output"])


@app.command()
def generate(
    target: str = typer.Argument(..., help="A run directory, a merged model directory, or a base model id/path."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One prompt; the reply streams to stdout."),
    input_file: Optional[str] = typer.Option(None, "--input", help="JSONL of prompts: {prompt}, {instruction, input} or {messages}."),
    output_file: Optional[str] = typer.Option(None, "--output", help="With --input: write completions here (default: stdout)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
    interactive: bool = typer.Option(False, "--interactive", help="Multi-turn chat (runs with a chat template)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt to put first."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    top_p: float = typer.Option(0.9, "--top-p", min=0.0, max=1.0),
    top_k: int = typer.Option(50, "--top-k", min=0),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.0),
    seed: int = typer.Option(0, "--seed"),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (ignores temperature/top-p/top-k)."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help="NAME=RUN_DIR: another adapter on the same base (repeatable)."),
    compare: bool = typer.Option(False, "--compare", help="With --prompt: answer with every adapter and the bare base, side by side."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per batch with --input."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Generate with exactly the template the run was trained with."""
    _quiet_libraries()  # first, so no library this command loads logs its import-time notices
    from qlora_cli.infer.generate import run_generate

    run_generate(
        target, prompt=prompt, input_file=input_file, output_file=output_file, interactive=interactive,
        system=system, adapters=adapter or [], compare=compare, batch_size=batch_size, console=err,
        trust_remote_code=trust_remote_code, overwrite=overwrite,
        sampling=dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      repetition_penalty=repetition_penalty, seed=seed, greedy=greedy),
    )


@app.command(name="eval")
def eval_(
    target: str = typer.Argument(..., help="A run directory, a merged model directory, or a base model id/path."),
    data_path: Optional[str] = typer.Option(
        None, "--data", help="Evaluate on this file (read like the run's first source) instead of the recipe's split."
    ),
    split: Optional[str] = typer.Option(
        None, "--split", help="validation (default) or train: which split of the recipe's data; with a hub --data, the hub split."
    ),
    compare_base: bool = typer.Option(False, "--compare-base", help="Also evaluate the base model without the adapter, with deltas."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Evaluate only the first N rows."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Rows per batch (default: the recipe's train.batch_size)."),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", min=1, help="Generation budget (default: the longest reference + 32 tokens)."
    ),
    no_generate: bool = typer.Option(False, "--no-generate", help="Loss, perplexity and token accuracy only (no exact match / ROUGE-L)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout instead of a table."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Loss, perplexity, token accuracy, exact match and ROUGE-L, with exactly the training template."""
    _quiet_libraries()  # first, so no library this command loads logs its import-time notices
    from qlora_cli.infer.eval_results import describe, render_table
    from qlora_cli.infer.evaluate import run_eval

    results = run_eval(
        target, data_path=data_path, split=split, compare_base=compare_base, max_samples=max_samples,
        batch_size=batch_size, max_new_tokens=max_new_tokens, generate=not no_generate, console=err,
        trust_remote_code=trust_remote_code,
    )
    if "write_error" in results:
        err.print(f"[yellow]warning:[/] {escape(results['write_error'])}")
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        out = Console(highlight=False)
        if "method" in results:  # a preference run (infer/preference_eval.py)
            from qlora_cli.infer.preference_eval import render_preference_table

            out.print(render_preference_table(results))
        else:
            out.print(render_table(results))
            out.print(escape(describe(results)), soft_wrap=True)
        for path in results.get("written", []):
            err.print(f"[dim]wrote {escape(path)}[/]")


@app.command()
def init(
    model: str = typer.Option("mistralai/Mistral-7B-v0.1", "--model", help="Base model: hub id or local directory."),
    fmt: StarterFormat = typer.Option(
        "alpaca", "--format", help="Data format of the recipe's source."
    ),
    output: str = typer.Option("recipe.yaml", "--output", "-o", help="Where to write the recipe (never overwritten)."),
):
    """Write a commented starter recipe for a model and data format, suited to this machine (GPU or CPU)."""
    from pathlib import Path

    from qlora_cli.recipe.starter import starter_recipe

    path = Path(output)
    if path.exists():
        raise UserError.single("--output", f"{path} already exists: choose another --output (it is never overwritten)")
    import torch  # here, not at the top: --help stays instant

    gpu = torch.cuda.is_available()
    try:
        with open(path, "x", encoding="utf-8") as f:  # "x": fails rather than replace a file made meanwhile
            f.write(starter_recipe(model, fmt, gpu=gpu))
    except OSError as exc:
        raise UserError.single("--output", f"cannot write {path}: {exc.strerror}") from None
    machine = "this GPU (bfloat16, paged_adamw_8bit)" if gpu else "a machine without a GPU (float32, adamw_torch)"
    err.print(f"[green]wrote[/] {escape(str(path))} for {machine}: edit data.sources[0].path, "
              f"then `qlora validate {escape(str(path))}`", soft_wrap=True)
    typer.echo(str(path))


@app.command()
def estimate(
    recipe: str = typer.Argument(..., help="Path to the YAML recipe."),
    gpu_memory: Optional[str] = typer.Option(
        None, "--gpu-memory", help="Memory to fit in, e.g. 24GB, 80GB or 22.5GiB; a bare number is GB (24 = 24GB). "
        "Default: this GPU's, if any."
    ),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
    nproc: int = typer.Option(1, "--nproc", help="GPUs (one process each) the run will use; the figures are per GPU, under distributed.strategy."),
    as_json: bool = typer.Option(False, "--json", help="Print the breakdown as JSON on stdout."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=REMOTE_CODE_HELP_TEXT),
):
    """Predict peak training memory per GPU from the recipe and the model's config.json (no weights downloaded)."""
    from qlora_cli.model.location import check_model_path
    from qlora_cli.model.remote_code import require_consent
    from qlora_cli.recipe.load import load_recipe

    if nproc < 1:
        raise UserError.single("--nproc", f"is {nproc}: give the number of GPUs, 1 or more")
    r = load_recipe(recipe, set_ or [])
    require_consent(r.model, trust_remote_code)  # reading a config with auto_map imports its code
    check_model_path(r.model)  # needs no library: a typo or a wrong path is reported at once
    _quiet_libraries()
    import torch
    from rich.table import Table

    from qlora_cli.estimate import GIB, suggestions
    from qlora_cli.estimate import estimate as run_estimate
    from qlora_cli.merge.weights import parse_size
    from qlora_cli.train.progress import format_memory

    if gpu_memory:
        budget = parse_size(gpu_memory, "--gpu-memory", bare="GB")
        bare = not gpu_memory.strip()[-1:].isalpha()
        budget_from = f"--gpu-memory {gpu_memory.strip()}" + (f", read as {budget / 1e9:g} GB" if bare else "")
    elif torch.cuda.is_available():
        budget = torch.cuda.get_device_properties(0).total_memory
        budget_from = f"the memory of this GPU, {torch.cuda.get_device_name(0)} (--gpu-memory to set another)"
    else:
        budget, budget_from = None, None
    try:
        est = run_estimate(r, nproc=nproc)
    except (OSError, ValueError) as exc:
        raise UserError.single("model.name_or_path", f"could not read the model's config.json: {str(exc).splitlines()[0]}") from None
    fits = None if budget is None else est.total <= budget
    if as_json:
        typer.echo(json.dumps({"parts_bytes": est.parts, "total_bytes": est.total, "budget_bytes": budget,
                               "budget_from": budget_from, "fits": fits,
                               "nproc": nproc, "strategy": r.distributed.strategy, "cpu_ram_bytes": est.offloaded,
                               "quantized_params": est.quantized_params, "other_params": est.other_params,
                               "trainable_params": est.trainable_params,
                               "quantized_fraction": round(est.quantized_fraction, 5), "refused": est.refused,
                               "notes": est.notes}, indent=2))
        return
    per_gpu = f" per GPU ({nproc} GPUs, {r.distributed.strategy})" if nproc > 1 else ""
    table = Table(title=f"estimated peak training memory{per_gpu}: {r.model.name_or_path}", title_justify="left")
    table.add_column("part")
    table.add_column("memory", justify="right")
    for label, value in est.parts.items():
        table.add_row(label, format_memory(value / GIB))
    table.add_row("[bold]total[/]", f"[bold]{format_memory(est.total / GIB)}[/]")
    for label, value in est.offloaded.items():
        table.add_row(f"[dim]{label} (offloaded to CPU RAM or NVMe, not counted)[/]", f"[dim]{format_memory(value / GIB)}[/]")
    out = Console(highlight=False)
    out.print(table)
    for note in est.notes:
        out.print(f"[dim]{escape(note)}[/]", soft_wrap=True)
    out.print(f"{est.quantized_params:,} parameters in 4 bits ({est.quantized_fraction:.1%} of the transformer "
              f"blocks' weights), {est.other_params:,} in full precision, "
              f"{est.trainable_params:,} trainable; batch {r.train.batch_size} x {r.data.max_seq_len} tokens, "
              f"gradient checkpointing {'on' if r.train.gradient_checkpointing else 'off'}", soft_wrap=True)
    if est.refused:
        out.print(f"[red]qlora train refuses this model:[/] {escape(est.refused)}", soft_wrap=True)
    if budget is None:
        out.print("no GPU here and no --gpu-memory: no verdict")
        return
    out.print(f"budget: {budget / GIB:.1f} GiB, from {escape(budget_from)}", soft_wrap=True)
    if fits:
        out.print(f"[green]fits[/] in {budget / GIB:.1f} GiB ({est.total / budget:.0%} of it)")
    else:
        out.print(f"[red]does not fit[/] in {budget / GIB:.1f} GiB ({est.total / budget:.0%} of it). To lower it:")
        for line in suggestions(r, est, nproc):
            out.print(f"  - {escape(line)}", soft_wrap=True)


@app.command()
def plot(
    runs: List[str] = typer.Argument(..., help="One or more run directories."),
    output: str = typer.Option("loss.png", "--output", "-o", help="PNG file to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
):
    """Draw train loss (raw and smoothed) and eval loss against step; several runs are overlaid."""
    from pathlib import Path

    from qlora_cli.util.files import check_output_path
    from qlora_cli.outputs.plots import plot_runs

    if not output.lower().endswith(".png"):
        raise UserError.single("--output", f"{output} is not a .png file name")
    check_output_path(Path(output), overwrite, kind=".png")
    written = plot_runs([Path(r) for r in runs], Path(output))
    typer.echo(str(written))


@app.command()
def schema():
    """Print the recipe's JSON Schema (for editor completion and validation)."""
    from qlora_cli.recipe.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


def _checked_recipe(recipe: str, set_, trust_remote_code: bool):
    """The recipe of `validate` and `data`, with the checks that need no library done first (a typo
    or a wrong path is reported at once), and the libraries' own chatter turned down."""
    from qlora_cli.data.sources import check_data_files
    from qlora_cli.model.location import check_model_path
    from qlora_cli.model.remote_code import require_consent
    from qlora_cli.recipe.load import load_recipe

    from qlora_cli.model.adapter import check_adapter, with_adapter_template

    r = with_adapter_template(load_recipe(recipe, set_ or []))  # model.adapter's run's template, if any
    require_consent(r.model, trust_remote_code)  # the tokenizer may bring code too
    check_model_path(r.model)
    check_data_files(r.data)
    check_adapter(r)
    _quiet_libraries()
    return r


def _quiet_libraries() -> None:
    """Keep library chatter (info logs, tqdm bars) out of the progress display; warnings still show."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Before bitsandbytes is imported: on CPUs with AVX-512 BF16 its import warns that the optional
    # `kernels` package is missing, which says nothing about the user's run.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    # Library deprecation notices (e.g. transformers renaming gradient_checkpointing) are for
    # this tool's developers, not its users; the test suite still shows them.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Raised in the middle of the live display at the first optimizer step; preflight.optimizer_note
    # says it once, before the run, in words that name the recipe key.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")


def _bare_resume_to_latest(args: list[str]) -> list[str]:
    """`--resume` may stand alone (newest checkpoint) or take a path; click options cannot be
    optional-valued, so a bare one (last, or followed by another option or the recipe) becomes
    `--resume latest`."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--resume":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("-") or nxt.endswith((".yaml", ".yml")):
                out.append(RESUME_LATEST)
    return out


def main() -> None:
    """Console-script entry point: run the app and map errors to exit codes.

    Typer's standalone mode handles usage errors (unknown flag, missing argument: exit 2) and
    --help itself; what reaches us is either a UserError (exit 2) or a bug (exit 1).
    """
    from qlora_cli.train.distributed import is_main_process

    try:
        app(args=_bare_resume_to_latest(sys.argv[1:]), prog_name="qlora")
    except StoppedRun as exc:
        if is_main_process():  # under a launcher every rank stops the same way; one says so
            err.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        from qlora_cli.train.stopping import worker_exit_code  # here: it imports transformers

        sys.exit(worker_exit_code(exc))
    except NothingToDo as exc:
        if is_main_process():
            err.print(escape(str(exc)), soft_wrap=True, highlight=False)
        sys.exit(0)
    except UserError as exc:
        if not is_main_process():  # every rank runs the same checks; rank 0 reports
            sys.exit(EXIT_USER_ERROR)
        err.print("[bold red]error:[/] ", end="")
        err.print(exc.render(), markup=False, highlight=False, soft_wrap=True)  # user text: no markup
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            # Ctrl-C that landed inside a library (e.g. during an import) and came back wrapped.
            err.print("interrupted")
            sys.exit(130)
        traceback.print_exc()
        err.print(f"[bold red]internal error[/] ({type(exc).__name__}); this is a bug in qlora, please report it")
        sys.exit(EXIT_INTERNAL_ERROR)
