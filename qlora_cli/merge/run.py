"""`qlora merge`: fold a run's adapter into its base model and measure what the user gets.

    result = merge("runs/tiny")                       # -> runs/tiny/merged
    result.output, result.report["fidelity"]

Order, for safety:
1. Everything that can fail on bad input (run dir, recipe, adapter, base shapes, output path,
   free space) is checked before anything is written.
2. The model is written into a hidden temporary directory beside the target, shard by shard.
3. The fidelity check runs on what was written, and merge_report.json is added.
4. Only then is the directory renamed into place. An interrupted merge leaves only the hidden
   `.NAME.partial-PID` directory (removed on the next merge), never one that looks complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_cli.errors import UserError, first_line
from qlora_cli.merge.weights import (
    BaseCheckpoint,
    inspect_model,
    merged_shard,
    merged_tensors,
    output_shards,
    save_shard,
    write_index,
    parse_size,
    plan_merge,
    read_adapter,
)
from qlora_cli.outputs.model_card import render_merge_card
from qlora_cli.outputs.run_dir import MERGE_REPORT, MODEL_CARD, RECIPE, SUMMARY, RunDir
from qlora_cli.util.dtypes import SHORT, short_name
from qlora_cli.util.files import swap_directory_into_place

BASE_MODES = ("dequantized", "original")
# Errors of the output location that the user can fix: full disk, quota, file size limit,
# permissions, read-only.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


@dataclass
class MergeResult:
    output: Path
    report: dict


def merge(
    run_dir: str | Path,
    output: str | Path | None = None,
    base_mode: str = "dequantized",
    dtype: str | None = None,
    max_shard_size: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
    compare: bool = False,
    console=None,
    trust_remote_code: bool = False,
) -> MergeResult:
    from qlora_cli.util.dtypes import torch_dtype
    from qlora_cli.model.remote_code import require_consent
    from qlora_cli.model.location import check_model_path
    from qlora_cli.recipe.load import load_recipe

    say = console.print if console is not None else (lambda *a, **k: None)
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError.single("RUN_DIR", f"{run.path} is not a directory: give the run directory `qlora train` wrote")
    if not (run / RECIPE).is_file():
        raise UserError.single("RUN_DIR", f"{run.path} has no {RECIPE}: is it a run directory written by `qlora train`?")
    if base_mode not in BASE_MODES:
        raise UserError.single("--base", f"unknown base {base_mode!r}: use one of {', '.join(BASE_MODES)}")
    recipe = load_recipe(run / RECIPE)
    # The run's recipe.yaml may say trust_remote_code: true; only the command line can allow it.
    require_consent(recipe.model, trust_remote_code, where=f"{run / RECIPE}: model.trust_remote_code")
    out_dtype_name = dtype or short_name(recipe.model.dtype)
    if out_dtype_name not in SHORT:
        raise UserError.single("--dtype", f"unknown dtype {dtype!r}: use one of {', '.join(SHORT)}")
    max_bytes = parse_size(max_shard_size) if max_shard_size else None
    adapter = read_adapter(run.path)
    out = Path(output) if output else run.path / "merged"

    check_model_path(recipe.model)
    base_folder = resolve_base(recipe.model)
    check_output(out, overwrite, base_folder, extra_protected=(run.path,))
    tokenizer = load_run_tokenizer(run)
    base = BaseCheckpoint.open(base_folder)
    config = load_base_config(base_folder, recipe.model)
    model_dtype = torch_dtype(recipe.model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where training quantized, normally
    quantized, tied = inspect_model(config, recipe.quant, model_dtype)
    plan = plan_merge(
        adapter, base, tied=tied, quantized=quantized, quant=recipe.quant,
        model_dtype=model_dtype, out_dtype=SHORT[out_dtype_name], device=device,
    )
    check_free_space(out, plan.output_bytes())

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    remove_stale_partials(out)
    try:
        tmp.mkdir(parents=True)
        start = time.perf_counter()
        say(f"merging {len(adapter.updates)} {adapter.kind} modules with the base {base_folder} into {out} "
            f"({base_mode} base, {out_dtype_name}, NF4 on {device})")
        shards = write_model(plan, tmp, base_mode, max_bytes)
        write_companions(config, plan, base_folder, tokenizer, tmp)
        report = build_report(run, base_folder, plan, base_mode, out_dtype_name, shards, time.perf_counter() - start)
        if verify:
            say("checking the merged model against the adapter on the quantized base")
            report["fidelity"] = verify_merge(recipe, run, tmp, plan, base_mode, compare)
            warn_if_unfaithful(report, say)
        (tmp / MODEL_CARD).write_text(render_merge_card(report, str(out)), encoding="utf-8")
        # What this merge wrote, so a later --overwrite deletes nothing else (check_output).
        report["files"] = sorted([p.name for p in tmp.iterdir()] + [MERGE_REPORT])
        (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if out.resolve().parent == run.path.resolve():
            run.record(out.name)  # the run's marker: a later `qlora train --overwrite` may replace it
        swap_directory_into_place(tmp, out, overwrite, "merging")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in OUTPUT_ERRNOS:
            raise UserError.single("--output", f"cannot write {out}: {exc.strerror}; nothing was written") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(out, report)


# --- Inputs ---------------------------------------------------------------------------------------


def resolve_base(model) -> Path:
    """The base model's local folder: the path itself, or the hub snapshot in the local cache."""
    path = Path(model.name_or_path).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            model.name_or_path, revision=model.revision, allow_patterns=["*.json", "*.safetensors"]
        ))
    except Exception as exc:  # network, auth, unknown repo: all fixable by the user
        raise UserError.single("model.name_or_path", f"cannot fetch {model.name_or_path}: {exc}") from None


def load_run_tokenizer(run: RunDir):
    """The run's tokenizer, with the template training rendered with (copied into the output)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(run.path)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError.single("RUN_DIR", f"cannot load the tokenizer saved in {run.path}: {first_line(exc)}") from None


def load_base_config(folder: Path, model):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError.single("model.name_or_path", f"cannot read {folder / 'config.json'}: {first_line(exc)}") from None
    if getattr(config, "quantization_config", None):
        raise UserError.single(
            "model.name_or_path",
            f"{folder} is a pre-quantized checkpoint; qlora merge needs the full-precision weights: point "
            "model.name_or_path in the run's recipe.yaml at the original model",
        )
    return config


def check_output(out: Path, overwrite: bool, base_folder: Path, extra_protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless --overwrite), or whose writing would touch the inputs."""
    if out.exists() and not out.is_dir():
        raise UserError.single("--output", f"{out} exists and is a file: choose another --output")
    here, base = out.resolve(), base_folder.resolve()
    if here == base or base in here.parents:
        raise UserError.single("--output", f"{out} is inside the base model {base_folder}: choose another --output")
    for keep in (Path.cwd(), base, *extra_protected):
        keep = keep.resolve()
        if keep == here or here in keep.parents:
            raise UserError.single("--output", f"{out} would replace {keep}, which the merge reads: choose another --output")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError.single("--output", f"{out} already exists: choose another --output, or pass --overwrite to replace it")
        # Only what `qlora merge` wrote (it always writes merge_report.json) may be replaced, so
        # --overwrite cannot delete a downloaded model or a project folder that has a config.json.
        if not (out / MERGE_REPORT).is_file():
            raise UserError.single(
                "--output", f"--overwrite only replaces an earlier `qlora merge` output (with {MERGE_REPORT}), and {out} has none"
            )
        try:
            wrote = set(json.loads((out / MERGE_REPORT).read_text(encoding="utf-8")).get("files") or [])
        except (OSError, ValueError, AttributeError):
            wrote = set()
        # Reports from before the list was kept name no files: those outputs are replaced whole, as then.
        foreign = sorted(p.name for p in out.iterdir() if wrote and p.name not in wrote)
        if foreign:
            raise UserError.single(
                "--output", f"--overwrite only replaces what `qlora merge` wrote, and {out} also holds "
                f"{', '.join(foreign[:5])}{' and more' if len(foreign) > 5 else ''}: move them out of it, or "
                "choose another --output",
            )
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError.single("--output", f"cannot create {out}: {parent} is not a writable directory")


def check_free_space(out: Path, needed: int) -> None:
    parent = next(p for p in out.absolute().parents if p.exists())
    free = shutil.disk_usage(parent).free
    if free < needed * 1.05 + 2**20:
        raise UserError.single(
            "--output", f"not enough space for {out}: the merged model needs about {needed / 1e9:.2f} GB, "
            f"{parent} has {free / 1e9:.2f} GB free; free some space or choose another --output",
        )


# --- Outputs --------------------------------------------------------------------------------------


def write_model(plan, folder: Path, base_mode: str, max_bytes: int | None) -> list[str]:
    """Stream the merged tensors into shards; output shards mirror the input's unless a size is given.
    A file is written as soon as its last tensor is merged, so memory holds one file's worth."""
    files = output_shards(plan, max_bytes)
    file_of = {key: name for name, keys in files.items() for key in keys}
    pending = {name: {} for name in files}
    sizes = {}
    for shard in plan.base.shards:
        for key, tensor in merged_shard(plan, shard, base_mode):
            name = file_of[key]
            pending[name][key] = tensor.contiguous()
            if len(pending[name]) == len(files[name]):
                tensors = pending.pop(name)
                save_shard(folder / name, tensors)
                sizes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
    write_index(folder, files, sizes)
    return list(files)


def write_companions(config, plan, base_folder: Path, tokenizer, folder: Path) -> None:
    """config.json (with the new dtype), generation_config.json (the base's, stopping on the run's
    stop token too: serving.py) and the run's tokenizer + template."""
    from qlora_cli.outputs.served_files import (
        keep_base_tokenizer_files,
        save_tokenizer,
        write_generation_config,
    )

    config.dtype = plan.out_dtype
    if plan.untie:  # the adapter changed one side of a tied pair: both are written, untied
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    write_generation_config(folder, base_folder, config, tokenizer)
    # The run's tokenizer carries the template training rendered with, so generate/serve match it;
    # written without generation blocks, so plain Jinja renders it too (serving.portable_jinja).
    save_tokenizer(tokenizer, folder)
    keep_base_tokenizer_files(folder, str(base_folder))  # tokenizer.model, a class llama.cpp's converter knows


def remove_stale_partials(out: Path) -> None:
    """Delete what interrupted merges into the same target left behind (their process is gone)."""
    if not out.parent.is_dir():
        return
    for p in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_report(run: RunDir, base_folder: Path, plan, base_mode: str, dtype: str, shards, seconds: float) -> dict:
    from qlora_cli.util.libraries import library_versions

    try:
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}  # an unfinished or damaged run: the device it trained on is unknown
    trained_on = summary.get("device") if isinstance(summary, dict) else None
    a = plan.adapter
    report = {
        "run_dir": str(run.path.resolve()),
        "base_model": str(base_folder.resolve()),
        "base": base_mode,
        "dtype": dtype,
        "adapter": {
            "kind": a.kind,
            "modules": len(a.updates),
            "modules_to_save": sorted(a.replacements),
            "r": a.config.get("r"),
            "lora_alpha": a.config.get("lora_alpha"),
        },
        "quantized_weights": len(plan.quantized),
        "untied": sorted(plan.untie),
        "nf4_device": plan.device,
        "trained_on": trained_on,
        "shards": shards,
        "seconds": round(seconds, 2),
        "versions": library_versions(),
    }
    if base_mode == "dequantized" and trained_on and trained_on != plan.device:
        report["note"] = (
            f"trained on {trained_on}, re-quantized on {plan.device}: bitsandbytes' quantizers on the two "
            "can differ by one step in a few double-quantized scales, so the match is close but not bit-exact"
        )
    return report


# --- Fidelity -------------------------------------------------------------------------------------

def warn_if_unfaithful(report: dict, say) -> None:
    """Judge every merged base against the precision floor (fidelity.judge); warn about the written
    one when it is measurably worse than precision alone explains."""
    from qlora_cli.merge.fidelity import judge

    fid = report["fidelity"]
    for r in fid["results"].values():
        r["worse_than_floor"] = judge(r, fid["floor"])
    r = fid["results"][report["base"]]
    if r["worse_than_floor"]:
        note = " (expected for --base original: see --compare)" if report["base"] == "original" else ""
        report["warning"] = (
            f"the merged model agrees with the adapter model on only {100 * r['top1_agreement']:.2f}% of "
            f"next tokens, measurably worse than the precision floor of "
            f"{100 * fid['floor']['top1_agreement']:.2f}% ({r['worse_than_floor']}){note}"
        )
        say(f"[bold yellow]warning:[/] {report['warning']}")


def verify_merge(recipe, run: RunDir, merged_dir: Path, plan, base_mode: str, compare: bool) -> dict:
    """Compare the written model (and, with --compare, the other base merged in memory) with the
    adapter applied to the 4-bit base, as training ran it."""
    import gc

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora_cli.merge.fidelity import compare as compare_logits
    from qlora_cli.merge.fidelity import (
        next_token_logits,
        precision_floor,
        probe_sequences,
    )
    from qlora_cli.model.load import device_map, load_base_model
    from qlora_cli.util.dtypes import torch_dtype

    sequences, source = probe_sequences(recipe)
    reference_model = PeftModel.from_pretrained(load_base_model(recipe.model, recipe.quant), str(run.path))
    reference = next_token_logits(reference_model, sequences)
    # What precision alone costs on the same rows: the same model in another precision (in place).
    floor = precision_floor(reference_model, reference, sequences, torch_dtype(recipe.model.dtype),
                            torch_dtype(recipe.quant.compute_dtype), plan.out_dtype)
    del reference_model
    gc.collect()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=plan.out_dtype, device_map=device_map())
    results = {base_mode: compare_logits(reference, next_token_logits(merged, sequences))}
    del merged
    gc.collect()
    if compare:
        other = next(m for m in BASE_MODES if m != base_mode)
        results[other] = compare_logits(reference, next_token_logits(in_memory_model(plan, other), sequences))
    return {"prompts": source, "results": results, "floor": floor}


def in_memory_model(plan, base_mode: str):
    """The model merged with the other base, built from a state dict without touching the disk."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from qlora_cli.model.load import device_map

    config = AutoConfig.from_pretrained(plan.base.folder)
    state = dict(merged_tensors(plan, base_mode))
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=plan.out_dtype, device_map=device_map())
