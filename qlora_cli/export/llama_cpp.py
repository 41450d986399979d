"""llama.cpp, found and run: its converter (`convert_hf_to_gguf.py`), `llama-quantize`, and for the
export check `llama-tokenize` and `llama-simple`.

    cpp = find_llama_cpp("--llama-cpp value or None", "--llama-cpp-bin value or None")
    cpp.convert(merged_dir, out / "model-f16.gguf", "f16")
    cpp.quantize(out / "model-f16.gguf", out / "model-q4_k_m.gguf", "q4_k_m")

Nothing here converts or quantizes by itself: GGUF is llama.cpp's format, and its own tools are
the ones that track its changes. This module finds them, says exactly what is missing and how to
get it, and turns their failures into messages a user can act on.

Where llama.cpp is looked for (the first that exists):
  source tree (the converter and its gguf-py): --llama-cpp DIR, $QLORA_LLAMA_CPP, ./llama.cpp
  binaries: --llama-cpp-bin DIR, $QLORA_LLAMA_CPP_BIN, DIR/build/bin, DIR/bin, then $PATH
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qlora_cli.errors import UserError

SOURCE_ENV, BIN_ENV = "QLORA_LLAMA_CPP", "QLORA_LLAMA_CPP_BIN"
DEFAULT_SOURCE = Path("llama.cpp")
CONVERTER = "convert_hf_to_gguf.py"

# What the converter writes by itself (--outtype); every other type goes through llama-quantize.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                  "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
RUNTIME = ("llama-tokenize", "llama-simple")  # the export check's two programs
CHAT = "llama-completion"  # llama.cpp's chat mode (-cnv), for the chat-template check when built

HOW_TO_GET = (
    "get llama.cpp's source (git clone https://github.com/ggml-org/llama.cpp) and point --llama-cpp (or "
    f"${SOURCE_ENV}) at it; build its tools with `cmake -B build -DGGML_NATIVE=OFF && cmake --build build "
    "--target llama-quantize llama-tokenize llama-simple` (the binaries land in build/bin)"
)


@dataclass
class LlamaCpp:
    source: Path  # the tree holding convert_hf_to_gguf.py and gguf-py/
    bin_dirs: list[Path] = field(default_factory=list)  # where its programs are looked for, in order

    def program(self, name: str) -> Path | None:
        for folder in self.bin_dirs:
            if (folder / name).is_file() and os.access(folder / name, os.X_OK):
                return folder / name
        found = shutil.which(name)
        return Path(found) if found else None

    def has_runtime(self) -> bool:
        return all(self.program(p) is not None for p in RUNTIME)

    def versions(self) -> dict:
        """What was used, for export_report.json: the source's revision, gguf-py's version, the binaries'."""
        out = {"source": str(self.source), "revision": _source_revision(self.source),
               "gguf_py": _gguf_py_version(self.source)}
        tokenize = self.program("llama-tokenize")
        if tokenize is not None:
            proc = _run([str(tokenize), "--version"], timeout=60)
            text = (proc.stdout + proc.stderr).strip()
            out["binaries"] = next((line for line in text.splitlines() if line.startswith("version")), first_line_of(text))
            out["bin"] = str(tokenize.parent)
        return out

    # --- The converter and the quantizer -------------------------------------------------------

    def check_architecture(self, architecture: str) -> None:
        """The converter registers a class per Hugging Face architecture name; refuse early (before a
        merge) when this llama.cpp has none for the model, rather than after minutes of work."""
        texts = [self.source / CONVERTER, *sorted((self.source / "conversion").glob("*.py"))]
        if not any(f'"{architecture}"' in p.read_text(encoding="utf-8", errors="replace") for p in texts if p.is_file()):
            raise UserError.single(
                "--llama-cpp", f"this llama.cpp ({self.source}) cannot convert {architecture} models: update it "
                "(git pull) to a version that lists that architecture in its converter",
            )

    def pre_tokenizers(self) -> list[str]:
        """The BPE pre-tokenizer names this converter can write (llama.cpp implements each)."""
        names = set()
        for p in [self.source / CONVERTER, *(self.source / "conversion").glob("*.py")]:
            if p.is_file():
                names.update(re.findall(r'\bres = "([^"]+)"', p.read_text(encoding="utf-8", errors="replace")))
        return sorted(names)

    def convert(self, model_dir: Path, out: Path, outtype: str, pre_tokenizer: str | None = None) -> None:
        """convert_hf_to_gguf.py in this Python (the converter also runs on transformers 5), with the
        tree's own gguf-py, as its README documents.

        pre_tokenizer: the name to record for a BPE tokenizer the converter's table does not know
        (it identifies a tokenizer by hashing how it splits a test text, so any tokenizer trained on
        one's own data is unknown to it, even one that splits exactly like GPT-2). The converter is
        run as it is, with only its table lookup answered; the export check then compares the two
        tokenizers on the run's texts, which tells whether the choice was right."""
        args = [str(model_dir), "--outfile", str(out), "--outtype", outtype]
        if pre_tokenizer is None:
            command = [sys.executable, str(self.source / CONVERTER), *args]
        else:
            code = (
                "import runpy, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; pre = sys.argv[2]; "
                "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre; "
                "script = sys.argv[1] + '/" + CONVERTER + "'; sys.argv = [script, *sys.argv[3:]]; "
                "runpy.run_path(script, run_name='__main__')"
            )
            command = [sys.executable, "-c", code, str(self.source), pre_tokenizer, *args]
        proc = _run(command, timeout=None)
        if proc.returncode != 0:
            if pre_tokenizer is not None and "conversion.base" in proc.stderr:
                raise UserError.single("--pre-tokenizer", f"this llama.cpp's converter ({self.source}) is laid out "
                                       "differently (no conversion/base.py): --pre-tokenizer needs a 2026 llama.cpp")
            raise _converter_error(proc.stderr, model_dir)

    def quantize(self, src: Path, dst: Path, qtype: str) -> None:
        program = self.program("llama-quantize")
        proc = _run([str(program), str(src), str(dst), qtype.upper()], timeout=None)
        if proc.returncode != 0:
            raise UserError.single("--quant", f"llama-quantize could not make {qtype}: {_last_error(proc)}")

    # --- The runtime (the export check) --------------------------------------------------------

    def tokenize(self, gguf: Path, text: str) -> list[int]:
        """The GGUF's tokenization of TEXT (special tokens parsed, BOS added as the model says)."""
        proc = _run([str(self.program("llama-tokenize")), "-m", str(gguf), "--ids", "--log-disable", "--stdin"],
                    timeout=300, input=text)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-tokenize failed: {_last_error(proc)}")
        match = re.search(r"\[([-\d,\s]*)\]\s*$", proc.stdout)
        if match is None:
            raise RuntimeError(f"llama-tokenize printed no id list: {proc.stdout[-300:]!r}")
        return [int(t) for t in match.group(1).replace(",", " ").split()]

    def chat_prompt_ids(self, gguf: Path, user: str) -> list[int]:
        """The token ids llama.cpp's chat mode builds for one user message: the GGUF's own chat template
        through llama.cpp's Jinja engine, as `--verbose-prompt` lists them."""
        # --jinja: without it llama-completion knows only the templates it recognises by heuristics, and
        # stops on any other ("this custom template is not supported").
        proc = _run([str(self.program(CHAT)), "-m", str(gguf), "--jinja", "-cnv", "-st", "-p", user, "-n", "1",
                     "--temp", "0", "--verbose-prompt", "--no-warmup"], timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{CHAT} failed: {_last_error(proc)}")
        log = proc.stderr + proc.stdout
        count = re.search(r"number of tokens in prompt = (\d+)", log)
        if count is None:
            raise RuntimeError(f"{CHAT} printed no prompt (--verbose-prompt): {_tail(log)}")
        # Lines such as "0.00.016.971 I    206 -> '###'" (a timestamp and level first, in this version).
        ids = re.findall(r"^(?:[\d.]+ [A-Z] )?\s*(-?\d+) -> '", log[count.end():], re.M)
        return [int(i) for i in ids[: int(count.group(1))]]

    def complete(self, gguf: Path, text: str, max_new_tokens: int) -> tuple[str, bool]:
        """Greedy continuation of TEXT by llama.cpp's runtime: (the new text, whether it stopped at an
        end-of-generation token before max_new_tokens). llama-simple echoes the prompt first, so it is
        run once more with no new tokens to learn exactly how it prints the prompt."""
        program = str(self.program("llama-simple"))
        full = _run([program, "-m", str(gguf), "-n", str(max_new_tokens), text], timeout=600)
        echo = _run([program, "-m", str(gguf), "-n", "0", text], timeout=600)
        for proc in (full, echo):
            if proc.returncode != 0:
                raise RuntimeError(f"llama-simple failed: {_last_error(proc)}")
        prompt = echo.stdout.removesuffix("\n")
        if not full.stdout.startswith(prompt):
            raise RuntimeError("llama-simple printed the prompt differently in two runs")
        decoded = re.search(r"decoded (\d+) tokens", full.stderr)
        stopped = decoded is not None and int(decoded.group(1)) < max_new_tokens
        return full.stdout[len(prompt):].removesuffix("\n"), stopped


def find_llama_cpp(source_flag: str | None, bin_flag: str | None) -> LlamaCpp:
    """llama.cpp as the flags, the environment or the default name it; UserError (exit 2) saying how to
    get it when it is not there."""
    if source_flag:
        source, where = Path(source_flag).expanduser(), "--llama-cpp"
    elif os.environ.get(SOURCE_ENV):
        source, where = Path(os.environ[SOURCE_ENV]).expanduser(), f"${SOURCE_ENV}"
    else:
        source, where = DEFAULT_SOURCE, "--llama-cpp"
        if not source.is_dir():
            raise UserError.single(
                "--llama-cpp", f"llama.cpp was not found (not given, ${SOURCE_ENV} unset, no ./llama.cpp): {HOW_TO_GET}"
            )
    if not (source / CONVERTER).is_file() or not (source / "gguf-py").is_dir():
        raise UserError.single(where, f"{source} is not a llama.cpp source tree (no {CONVERTER} and gguf-py/): {HOW_TO_GET}")
    bins = [Path(p).expanduser() for p in (bin_flag, os.environ.get(BIN_ENV)) if p]
    for given, name in ((bin_flag, "--llama-cpp-bin"), (os.environ.get(BIN_ENV), f"${BIN_ENV}")):
        if given and not Path(given).expanduser().is_dir():
            raise UserError.single(name, f"{given} is not a directory (it should hold llama.cpp's built programs)")
    return LlamaCpp(source.resolve(), [*bins, source / "build" / "bin", source / "bin"])


def check_converter_needs(model_dir: Path) -> None:
    """What the converter imports for this model, checked before any work: SentencePiece models
    (tokenizer.model) need the `sentencepiece` package, or the converter stops with ModuleNotFoundError."""
    import importlib.util

    if (model_dir / "tokenizer.model").is_file() and importlib.util.find_spec("sentencepiece") is None:
        raise UserError.single(
            "--format", f"{model_dir} has a SentencePiece tokenizer (tokenizer.model), and llama.cpp's converter "
            "needs the `sentencepiece` package to read it: pip install sentencepiece (or pip install 'qlora[export]')",
        )


def _converter_error(stderr: str, model_dir: Path) -> UserError:
    if "BPE pre-tokenizer was not recognized" in stderr:
        return UserError.single(
            "--pre-tokenizer", f"llama.cpp's converter does not know the tokenizer of {model_dir}: it recognises BPE "
            "tokenizers by how they split a test text, and this one is not in its table (a tokenizer trained on your "
            "own data never is). Options: if it splits text like a known one (a byte-level BPE with GPT-2's rules "
            "does), name that with --pre-tokenizer gpt-2 (or llama3, qwen2, ...; the export check then compares "
            "both tokenizers on your texts); register it in llama.cpp (convert_hf_to_gguf_update.py); or fine-tune "
            "a released model whose tokenizer llama.cpp lists",
        )
    if "ModuleNotFoundError" in stderr:
        missing = re.findall(r"No module named '([^']+)'", stderr)
        return UserError.single(
            "--llama-cpp", f"llama.cpp's converter needs the Python package {missing[-1] if missing else '(see below)'}: "
            f"pip install it into this environment ({_tail(stderr)})",
        )
    return UserError.single("--llama-cpp", f"llama.cpp's converter failed on {model_dir}: {_tail(stderr)}")


def _run(args: list[str], timeout: float | None, input: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except OSError as exc:
        raise UserError.single("--llama-cpp-bin", f"cannot run {args[0]}: {exc.strerror}") from None


def _last_error(proc: subprocess.CompletedProcess) -> str:
    return _tail(proc.stderr or proc.stdout) or f"exit status {proc.returncode}"


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1].strip()


def first_line_of(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown"


def _source_revision(source: Path) -> str:
    rev = source / "SOURCE_REV.txt"
    if rev.is_file():
        return rev.read_text(encoding="utf-8").strip()
    proc = _run(["git", "-C", str(source), "describe", "--tags", "--always", "--dirty"], timeout=30) \
        if shutil.which("git") else None
    return proc.stdout.strip() if proc is not None and proc.returncode == 0 else "unknown"


def _gguf_py_version(source: Path) -> str:
    project = source / "gguf-py" / "pyproject.toml"
    if project.is_file():
        match = re.search(r'^version\s*=\s*"([^"]+)"', project.read_text(encoding="utf-8"), re.M)
        if match:
            return match.group(1)
    return "unknown"
