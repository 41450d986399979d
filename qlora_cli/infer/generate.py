"""`qlora generate`: sample from a run, a merged model or a base, with the training template.

    target = load_target("runs/tiny")
    text = complete(target, target.prompt_ids("Count from 3 to 7."), Sampling(greedy=True)).text

Generation stops at the template's stop token or the tokenizer's EOS (training put the stop
token inside the loss, so a trained model emits it). Prompts and replies never go through a
second formatting path: `Target.prompt_ids` renders with the run's own template.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rich.markup import escape

from qlora_cli.errors import UserError
from qlora_cli.util.files import check_output_path, write_atomically

BASE = "base"  # the name --compare gives the bare base model (adapters disabled)


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    greedy: bool = False
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.greedy or self.temperature == 0:
            # Unset the sampling knobs too, or transformers warns that they are ignored.
            return dict(do_sample=False, temperature=None, top_p=None, top_k=None,
                        repetition_penalty=self.repetition_penalty)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    stopped: bool  # ended on a stop token (not cut by max_new_tokens)


@contextmanager
def using_adapter(target, adapter: str | None):
    """Run with one adapter active (by name), with none (BASE), or as loaded (None)."""
    model = target.model
    if adapter is None:
        yield
    elif adapter == BASE:
        with model.disable_adapter():
            yield
    else:
        previous = model.active_adapter
        model.set_adapter(adapter)
        try:
            yield
        finally:
            model.set_adapter(previous)


@torch.no_grad()
def complete_batch(target, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None,
                   streamer=None) -> list[Completion]:
    """Generate for several prompts at once (left-padded, so every reply starts at the same column)."""
    tok = target.tokenizer  # loaded by load_tokenizer, so it has a pad token (the EOS where the model has none)
    padded = tok.pad([{"input_ids": p} for p in prompts], padding_side="left", return_tensors="pt")
    ids, mask, width = padded["input_ids"], padded["attention_mask"], padded["input_ids"].shape[1]
    device = next(target.model.parameters()).device
    torch.manual_seed(sampling.seed)
    with using_adapter(target, adapter):
        out = target.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=sampling.max_new_tokens,
            eos_token_id=target.stop_ids, pad_token_id=tok.pad_token_id, streamer=streamer, **sampling.generate_kwargs(),
        )
    completions = []
    stops = set(target.stop_ids)
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        new = row if end is None else row[: end + 1]
        completions.append(Completion(tok.decode(new, skip_special_tokens=True).strip(), new, end is not None))
    return completions


def complete(target, prompt_ids: list[int], sampling: Sampling, adapter: str | None = None, stream=None) -> Completion:
    """One prompt; with `stream` (a text file), the reply is written there token by token."""
    streamer = None if stream is None else text_streamer(target.tokenizer, stream)
    return complete_batch(target, [prompt_ids], sampling, adapter, streamer)[0]


def text_streamer(tokenizer, stream):
    """transformers' TextStreamer (whole words, special tokens skipped), writing to `stream`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# --- Batch files -----------------------------------------------------------------------------------


MAX_REPORTED_LINES = 20  # bad --input lines listed in one message; the rest are counted


def read_prompts(path: Path) -> list[dict]:
    """JSONL rows: {"prompt": ...}, {"instruction": ..., "input": ...} or {"messages": [...]}, or a string.

    Any line that cannot be a prompt stops the command: every prompt is answered or none. The
    message names every bad line (the first MAX_REPORTED_LINES), so one pass over the file fixes it.
    """
    if path.is_dir():
        raise UserError.single("--input", f"{path} is a directory: give a JSONL file with one prompt per line")
    if not path.is_file():
        raise UserError.single("--input", f"file not found: {path}")
    rows, problems, bad = [], [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                rows.append(_prompt_row(raw, where))
            except UserError as exc:
                bad += 1
                problems += exc.problems[: max(0, MAX_REPORTED_LINES - len(problems))]
    if problems:
        more = f" ({bad - len(problems)} more not shown)" if bad > len(problems) else ""
        raise UserError(problems, header=f"{bad} line(s) of {path} cannot be a prompt{more}; fix or remove them:")
    if not rows:
        raise UserError.single("--input", f"{path} has no prompts: write one JSON object per line")
    return rows


def _prompt_row(raw: bytes, where: str) -> dict:
    """One non-blank line of an --input file as a prompt row, or a UserError naming the line."""
    from qlora_cli.data.sources import MAX_JSON_DEPTH, deep_json_lines

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError.single(where, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}): save the file as UTF-8") from None
    # Bounded before parsing, as data files are: json.loads raises RecursionError past about 1,000 levels.
    if deep_json_lines(raw):
        raise UserError.single(
            where, f"nested more than {MAX_JSON_DEPTH} levels deep (a prompt nests a few): fix or remove the line"
        )
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise UserError.single(where, f"not valid JSON ({exc.msg}): fix or remove the line") from None
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict) or not _prompt_of(row):
        raise UserError.single(
            where, "needs a non-empty 'prompt' or 'instruction' string, or a 'messages' list ending with a user turn"
        )
    _check_text(json.dumps(row, ensure_ascii=False), where)
    return row


def _check_text(text: str, where: str) -> None:
    """A lone surrogate (json.loads of a broken \\ud800 escape) is not text: the tokenizer refuses it."""
    from qlora_cli.data.tokenize import lone_surrogate

    at = lone_surrogate(text)
    if at is not None:
        raise UserError.single(
            where, f"holds a lone surrogate {text[at]!r} (half of a UTF-16 pair without the other half, from a "
            f"broken \\u escape), which is not text; it follows {text[max(0, at - 30):at]!r}: fix or remove the line",
        )


def _check_argument(flag: str, text: str | None) -> None:
    """Refuse an argument holding bytes that are not UTF-8 (typed in a Latin-1 terminal, say)."""
    bad = _not_utf8(text) if text is not None else None
    if bad:
        raise UserError.single(
            flag, f"is not valid UTF-8 ({bad}): give the text in UTF-8 (check the terminal's or the locale's encoding)"
        )


def _not_utf8(text: str) -> str | None:
    """Where text that came from bytes (argv, stdin) was not UTF-8, or None.

    Python hands such bytes over as surrogate escapes (0xe9 -> U+DCE9), which no tokenizer takes.
    """
    from qlora_cli.data.tokenize import lone_surrogate

    at = lone_surrogate(text)
    if at is None:
        return None
    code = ord(text[at])
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    return f"{byte} after {text[:at][-30:]!r}"


def _prompt_of(row: dict):
    if isinstance(row.get("messages"), list) and row["messages"]:
        last = row["messages"][-1]
        return isinstance(last, dict) and last.get("role") == "user" and isinstance(last.get("content"), str)
    for key in ("prompt", "instruction"):
        if isinstance(row.get(key), str) and row[key].strip():
            return True
    return False


def write_jsonl_atomically(path: Path, rows: list[dict]) -> None:
    """Write next to the target and rename, so an interrupted run never leaves half a file."""
    try:
        write_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    except OSError as exc:
        raise UserError.single("--output", f"cannot write {path}: {exc.strerror}") from None


# --- The command -----------------------------------------------------------------------------------


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip() or name.strip() == BASE:
            raise UserError.single("--adapter", f"{spec!r}: write NAME=RUN_DIR (NAME not '{BASE}')")
        adapters[name.strip()] = path.strip()
    return adapters


def run_generate(target_path: str, *, prompt, input_file, output_file, interactive, system, adapters, compare,
                 batch_size, sampling: dict, console, trust_remote_code: bool = False, overwrite: bool = False) -> None:
    import sys

    from qlora_cli.infer.target import load_target

    modes = [m for m, on in (("--prompt", prompt is not None), ("--input", input_file), ("--interactive", interactive)) if on]
    if len(modes) != 1:
        raise UserError.single("generate", "give exactly one of --prompt TEXT, --input FILE.jsonl or --interactive")
    if prompt is not None and not prompt.strip():
        raise UserError.single("--prompt", "is empty: give the text to answer")
    _check_argument("--prompt", prompt)
    _check_argument("--system", system)
    if compare and prompt is None:
        raise UserError.single("--compare", "works with --prompt")
    if output_file and not input_file:
        raise UserError.single("--output", "works with --input")
    rows = read_prompts(Path(input_file)) if input_file else None
    if output_file:
        check_output_path(Path(output_file), overwrite)
    named = parse_adapters(adapters)

    target = load_target(target_path, adapters=named, trust_remote_code=trust_remote_code)
    if interactive and target.template is None:
        raise UserError.single("--interactive", f"{target_path} was trained on plain text and has no chat template")
    s = Sampling(**sampling)
    if prompt is not None and compare:
        _compare(target, prompt, system, s, console)
    elif prompt is not None:
        c = complete(target, target.prompt_ids(prompt, system), s, stream=sys.stdout)
        if not c.stopped:
            console.print(f"[yellow](stopped at --max-new-tokens {s.max_new_tokens}, not at a stop token)[/]")
    elif rows is not None:
        _batch(target, rows, system, s, batch_size, output_file, console)
    else:
        _chat(target, system, s, console)


def _compare(target, prompt: str, system, s: Sampling, console) -> None:
    """One row per adapter, each prompted with its own run's template (an adapter answers well only
    in the format it was trained on), then the bare base, prompted as TARGET's run is."""
    from rich.console import Console
    from rich.table import Table

    if target.kind != "run":
        raise UserError.single("--compare", "needs a run directory as TARGET (adapters on a base)")
    table = Table(title=prompt, show_lines=True, title_justify="left")
    table.add_column("model")
    table.add_column("template")
    table.add_column("reply")
    for adapter in [*target.adapters, BASE]:
        view = target.view(adapter)
        c = complete(view, view.prompt_ids(prompt, system), s, adapter=adapter)
        table.add_row(_row_label(target, adapter), _template_name(view),
                      escape(c.text) + ("" if c.stopped else " [dim](cut)[/]"))
    table.caption = f"{BASE}: the base model without any adapter, prompted with {target.name}'s template"
    Console(highlight=False).print(table)


def _row_label(target, adapter: str) -> str:
    """TARGET's own adapter (PEFT calls it "default") is labelled by its run's name; --adapter ones by NAME."""
    if adapter != target.adapters[0]:
        return adapter
    return target.name if target.name not in (*target.adapters[1:], BASE) else target.path


def _template_name(target) -> str:
    return "plain text" if target.template is None else target.template.name


def _batch(target, rows: list[dict], system, s: Sampling, batch_size: int, output_file, console) -> None:
    from rich.progress import Progress

    results = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating", total=len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = [target.prompt_ids(r, system) for r in chunk]
            for row, c in zip(chunk, complete_batch(target, ids, s)):
                results.append({**row, "completion": c.text, "stopped": c.stopped})
            progress.advance(task, len(chunk))
    if output_file:
        write_jsonl_atomically(Path(output_file), results)
        console.print(f"[green]done[/] {len(results)} completions in {output_file}")
    else:
        for row in results:
            print(json.dumps(row, ensure_ascii=False))


def _chat(target, system, s: Sampling, console) -> None:
    """A multi-turn loop: each reply is appended to the conversation. /reset starts over, /exit (or EOF) ends."""
    import sys

    messages = [{"role": "system", "content": system}] if system else []
    console.print("[dim]chat: /reset starts over, /exit or Ctrl-D ends[/]")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except UnicodeDecodeError as exc:  # stdin decoded strictly, and the line was not UTF-8
            bad = f"byte 0x{exc.object[exc.start]:02x}"
        else:
            bad = _not_utf8(line)  # stdin decoded with surrogateescape (Python's choice in the C locales)
        if bad:  # a slip of the terminal: say so and keep the conversation going
            console.print(f"[yellow]that line is not valid UTF-8 ({escape(bad)}): type it again[/]")
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = messages[:1] if system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        c = complete(target, target.prompt_ids(messages), s, stream=sys.stdout)
        messages.append({"role": "assistant", "content": c.text})
