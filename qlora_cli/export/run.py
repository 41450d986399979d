"""`qlora export`: a run as a GGUF file for llama.cpp (and LM Studio), or as an Ollama model.

    result = export("runs/tiny", fmt="gguf", quant="q8_0")
    result["files"], result["check"]

1. Checks that need no model, first: TARGET, the quant type, llama.cpp (the converter; for k-quants
   llama-quantize), the architecture and the converter's Python needs, the output location.
2. The merged model: TARGET/merged when `qlora merge` wrote it onto the dequantized 4-bit base, or a
   new merge there (with its fidelity check). Never the adapter alone on the original 16-bit
   weights: on stories260K that agrees with the trained model on 70% of next tokens, the
   dequantized merge on 100%.
3. llama.cpp's converter writes f32/f16/bf16/q8_0 itself; other types are quantized by
   llama-quantize from a 16-bit GGUF.
4. `--format ollama` adds a Modelfile (ollama.py).
5. The check (verify.py), then export_report.json, and only then the folder is renamed into place:
   an interrupted export leaves no folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.export.llama_cpp import CONVERTER_TYPES, QUANTIZE_TYPES, check_converter_needs, find_llama_cpp
from qlora_cli.outputs.run_dir import MERGE_REPORT, RECIPE
from qlora_cli.util.files import sha256_file, swap_directory_into_place, write_atomically, write_json_atomically

FORMATS = ("gguf", "ollama")
QUANTS = CONVERTER_TYPES + QUANTIZE_TYPES
REPORT = "export_report.json"
MODELFILE = "Modelfile"


def export(target: str, *, fmt: str = "gguf", quant: str = "q8_0", output: str | None = None,
           llama_cpp: str | None = None, llama_cpp_bin: str | None = None, pre_tokenizer: str | None = None,
           overwrite: bool = False, verify: bool = True, console=None, trust_remote_code: bool = False) -> dict:
    from rich.console import Console

    console = console or Console(stderr=True)
    start = time.perf_counter()
    if fmt not in FORMATS:
        raise UserError.single("--format", f"{fmt!r} is not a format: use one of {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise UserError.single("--quant", f"{quant!r} is not a GGUF type this export makes: use one of {', '.join(QUANTS)}")
    run_dir, merged_dir = _what_to_export(Path(target).expanduser())
    cpp = find_llama_cpp(llama_cpp, llama_cpp_bin)
    if quant in QUANTIZE_TYPES and cpp.program("llama-quantize") is None:
        raise UserError.single(
            "--quant", f"{quant} is made by llama.cpp's llama-quantize, which was not found (--llama-cpp-bin, "
            f"$QLORA_LLAMA_CPP_BIN, {cpp.source}/build/bin or $PATH): build it (cmake --build build --target "
            "llama-quantize), or choose one of " + ", ".join(CONVERTER_TYPES),
        )
    if pre_tokenizer is not None and pre_tokenizer not in (known := cpp.pre_tokenizers()):
        raise UserError.single("--pre-tokenizer", f"{pre_tokenizer!r} is not one this llama.cpp knows: use one of "
                               f"{', '.join(known)}")
    model_folder = merged_dir if merged_dir is not None else _base_folder(run_dir)
    cpp.check_architecture(_architecture(model_folder))
    check_converter_needs(model_folder)
    out = Path(output).expanduser() if output else _default_output(run_dir or merged_dir, fmt, quant)
    _check_output(out, overwrite)

    if merged_dir is None:  # a run without a merged model yet: merge it, as `qlora merge` would
        from qlora_cli.merge.run import merge

        console.print(f"[bold]merging[/] {run_dir} (the adapter onto the dequantized 4-bit base) first")
        merged_dir = merge(run_dir, console=console, trust_remote_code=trust_remote_code).output

    from qlora_cli.infer.target import merged_tokenizer

    tokenizer, template, recipe = merged_tokenizer(merged_dir, trust_remote_code)
    name = f"model-{quant}.gguf"
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        gguf = _convert(cpp, merged_dir, tmp, name, quant, pre_tokenizer, console)
        if fmt == "ollama":
            from qlora_cli.export.ollama import modelfile

            write_atomically(tmp / MODELFILE, modelfile(name, template, tokenizer, (run_dir or merged_dir).name))
        check = None
        if verify:
            if recipe is None:
                check = {"skipped": f"{merged_dir}'s run (its recipe, with the data to check on) is not there"}
            else:
                from qlora_cli.export.verify import check_export

                console.print("[bold]checking[/] the export against the merged model")
                check = check_export(cpp, tmp / name, merged_dir, recipe, tokenizer, template, console=console)
        report = {
            "format": fmt, "quant": quant, "gguf": name, "bytes": gguf.stat().st_size, "sha256": sha256_file(gguf),
            "merged_model": str(merged_dir.resolve()), "run_dir": str(run_dir.resolve()) if run_dir else None,
            "template": template.name if template is not None else None, "pre_tokenizer": pre_tokenizer,
            "llama_cpp": cpp.versions(), "seconds": round(time.perf_counter() - start, 1), "check": check,
        }
        write_json_atomically(tmp / REPORT, report, indent=2)
        swap_directory_into_place(tmp, out, overwrite, "exporting")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["output"] = str(out)
    report["files"] = sorted(p.name for p in out.iterdir())
    return report


def _what_to_export(path: Path) -> tuple[Path | None, Path | None]:
    """(run directory, merged model directory) of TARGET; either may be None, not both."""
    if (path / RECIPE).is_file() and (path / "adapter_config.json").is_file():
        merged = path / "merged"
        if not (merged / MERGE_REPORT).is_file():
            return path, None
        base = json.loads((merged / MERGE_REPORT).read_text(encoding="utf-8")).get("base")
        if base != "dequantized":
            raise UserError.single(
                "TARGET", f"{merged} was merged onto the original weights (--base {base}), which answer less like the "
                f"trained model than the dequantized 4-bit base: merge again (qlora merge {path} --overwrite), or give "
                f"{merged} as TARGET to export it as it is",
            )
        return path, merged
    if (path / MERGE_REPORT).is_file() and (path / "config.json").is_file():
        run = Path(json.loads((path / MERGE_REPORT).read_text(encoding="utf-8")).get("run_dir", ""))
        return (run if (run / RECIPE).is_file() else None), path
    raise UserError.single(
        "TARGET", f"{path} is neither a run directory (with {RECIPE} and an adapter) nor a merged model (with "
        f"{MERGE_REPORT}): give what `qlora train` or `qlora merge` wrote",
    )


def _base_folder(run_dir: Path) -> Path:
    from qlora_cli.merge.run import resolve_base
    from qlora_cli.recipe.load import load_recipe

    return resolve_base(load_recipe(run_dir / RECIPE).model)


def _architecture(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return config["architectures"][0]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise UserError.single("TARGET", f"{folder}/config.json names no model architecture") from None


def _default_output(source: Path, fmt: str, quant: str) -> Path:
    """RUN/gguf-q8_0 or RUN/ollama-q8_0 (beside the merged model when TARGET is one without its run)."""
    folder = source if (source / RECIPE).is_file() else source.parent
    return folder / f"{fmt}-{quant}"


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_file():
        raise UserError.single("--output", f"{out} is a file: give a directory for the export")
    if out.exists():
        if not overwrite:
            raise UserError.single("--output", f"{out} already exists: pass --overwrite to replace it, or choose another --output")
        if not (out / REPORT).is_file():
            raise UserError.single("--output", f"--overwrite only replaces an earlier `qlora export` (with {REPORT}), "
                                   f"and {out} has none: choose another --output")
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError.single("--output", f"cannot create {out}: {parent} is not a writable directory")


def _convert(cpp, merged_dir: Path, folder: Path, name: str, quant: str, pre_tokenizer: str | None, console) -> Path:
    target = folder / name
    if quant in CONVERTER_TYPES:
        console.print(f"[bold]converting[/] {merged_dir} to {quant} with llama.cpp's converter")
        cpp.convert(merged_dir, target, quant, pre_tokenizer)
        return target
    # k-quants and the like start from a 16-bit GGUF: bf16 for bf16 models (no range lost), else f16.
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")  # transformers 5 writes dtype, 4 torch_dtype
    middle = "bf16" if dtype == "bfloat16" else "f16"
    intermediate = folder / f".model-{middle}.gguf"
    console.print(f"[bold]converting[/] {merged_dir} to {middle} with llama.cpp's converter, then llama-quantize to {quant}")
    cpp.convert(merged_dir, intermediate, middle, pre_tokenizer)
    cpp.quantize(intermediate, target, quant)
    intermediate.unlink()
    return target


# --- What the command prints -----------------------------------------------------------------------


def render_check(report: dict):
    """The check as a table, like `qlora merge`'s fidelity table, and a one-line verdict."""
    from rich.table import Table

    check = report.get("check") or {}
    table = Table(title=f"export check: {report['gguf']} against the merged model ({check.get('rows', 0)} rows)",
                  title_justify="left")
    table.add_column("what")
    table.add_column("result", justify="right")
    table.add_column("measured by")
    meta = check.get("metadata") or {}
    if meta:
        table.add_row("chat template in the GGUF", "identical" if meta.get("chat_template_identical") else
                      ("[red]differs[/]" if meta.get("has_chat_template") else "none"), "gguf-py reader")
        table.add_row("BOS / EOS ids", "same" if meta.get("bos_matches") and meta.get("eos_matches") else "[red]differ[/]",
                      "gguf-py reader")
    tok = check.get("tokenization")
    if tok:
        share = tok["identical"] / tok["texts"] if tok["texts"] else 0
        style = "" if share == 1 else "[red]"
        table.add_row("tokenization identical", f"{style}{tok['identical']}/{tok['texts']} ({share:.1%})",
                      "llama-tokenize")
    chat = check.get("chat")
    if chat:
        style = "" if chat["identical"] == chat["prompts"] else "[red]"
        table.add_row("chat-mode prompt identical", f"{style}{chat['identical']}/{chat['prompts']}",
                      "llama-completion -cnv (GGUF template)")
    elif check.get("chat_skipped"):
        table.add_row("chat-mode prompt identical", "skipped", check["chat_skipped"])
    greedy = check.get("greedy")
    if greedy:
        table.add_row("greedy answer identical", f"{greedy['identical']}/{greedy['prompts']} "
                      f"(common prefix {greedy['mean_common_prefix']:.1%})", "llama-simple vs transformers")
        table.add_row("answer stopped by itself", f"{greedy['llama_cpp_stopped']}/{greedy['prompts']} "
                      f"(merged model {greedy['merged_stopped']}/{greedy['prompts']})", "llama-simple")
    weights = check.get("weights") or {}
    if "top1_agreement" in weights:
        table.add_row("top-1 next-token agreement", f"{weights['top1_agreement']:.2%} of {weights['positions']:,}",
                      "GGUF weights in transformers")
        table.add_row("mean KL", f"{weights['mean_kl']:.2e}", "GGUF weights in transformers")
    elif weights.get("skipped"):
        table.add_row("top-1 next-token agreement", "skipped", weights["skipped"])
    return table


def verdict(report: dict) -> tuple[str, bool]:
    """(one line, whether it is a problem) for the end of the command's output."""
    check = report.get("check")
    if check is None:
        return "the export was not checked (--no-verify)", False
    if "rows" not in check:
        return f"the export was not checked: {check.get('skipped')}", False
    problems = [f"llama.cpp's runtime failed on the GGUF: {check['runtime_error']}"] if check.get("runtime_error") else []
    meta = check.get("metadata") or {}
    if meta and not meta.get("chat_template_identical") and report.get("template"):
        problems.append("the GGUF's chat template differs from the run's")
    tok = check.get("tokenization")
    if tok and tok["identical"] != tok["texts"]:
        problems.append(f"llama.cpp tokenizes {tok['texts'] - tok['identical']} of {tok['texts']} texts differently")
    chat = check.get("chat")
    if chat and chat["identical"] != chat["prompts"]:
        problems.append(f"llama.cpp's chat mode builds {chat['prompts'] - chat['identical']} of {chat['prompts']} "
                        "prompts otherwise than training")
    greedy = check.get("greedy")
    if greedy and greedy["llama_cpp_stopped"] < greedy["merged_stopped"]:
        problems.append("llama.cpp did not stop where the merged model did")
    if problems:
        return "; ".join(problems), True
    if "skipped" in check:
        return f"metadata and weights checked; {check['skipped']}", False
    line = "llama.cpp reads, tokenizes and stops like the merged model"
    if greedy and greedy["identical"] < greedy["prompts"]:
        # Not a fault of the export: a quantized type changes some next tokens, and a greedy answer
        # follows its first change; the top-1 figure says how often that happens.
        top1 = (check.get("weights") or {}).get("top1_agreement")
        line += (f"; its greedy answers equal the merged model's on {greedy['identical']} of {greedy['prompts']} prompts"
                 + (f" ({report.get('quant')} weights agree on {top1:.2%} of next tokens)" if top1 is not None else ""))
    return line, False
