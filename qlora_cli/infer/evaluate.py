"""`qlora eval`: loss, perplexity, token accuracy, exact match and ROUGE-L, with the training template.

    target = load_target("runs/tiny")
    rows = eval_rows(target, split="validation")          # tokenized exactly as training did
    scores = evaluate(target, rows, batch_size=8)         # {"loss": ..., "exact_match": ..., ...}

The rows come from the run's own data pipeline (`build_datasets`), so the prompt rendering, the
tokenization and the response mask are the ones training used. Two things differ on purpose:
  - the mask is always response-only (`train_on_inputs` off), because the loss and perplexity an
    eval reports are about the answers, whatever the run trained on;
  - each row is scored once, whatever its weight in the training mix.

Loss is the mean over every response token of every row (token-weighted, so long answers count
per token, as perplexity does), and perplexity is exp(loss). Token accuracy is the share of those
tokens that are the model's argmax. For the generation metrics each row's *last* reply is cut off,
the prompt before it is generated from greedily, and the answer is compared with the reference:
exact match after whitespace normalisation, and ROUGE-L F1 from Google's `rouge-score` package.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qlora_cli.errors import Problem, UserError
from qlora_cli.infer.generate import BASE, Sampling, complete_batch, using_adapter

SPLITS = ("validation", "train")
GENERATION_MARGIN = 32  # default max_new_tokens = the longest reference + this many tokens


@dataclass
class EvalRows:
    rows: list[dict]  # {"input_ids": [...], "labels": [...]}: response-only labels
    description: str  # where they came from, for the table and eval_results.json
    has_replies: bool  # False for plain-text data: loss only, nothing to generate


# --- Which rows --------------------------------------------------------------------------------


def eval_rows(target, data_path: str | None = None, split: str | None = None, max_samples: int | None = None) -> EvalRows:
    """The rows to score: the recipe's validation (or train) split, or every row of --data."""
    from qlora_cli.data.pipeline import build_datasets

    recipe = target.recipe
    if data_path is None:
        if recipe is None:
            raise UserError.single(
                "--data", f"{target.path} has no recipe to take a validation split from: give --data FILE"
            )
        split = split or "validation"
        check_split(split)
        data = recipe.data.model_copy(update={"train_on_inputs": False})
        seed, batch = recipe.train.seed, recipe.train.batch_size
    else:
        data = _data_section_for(target, data_path, split)
        seed, batch = (recipe.train.seed, recipe.train.batch_size) if recipe is not None else (0, 8)
        split = "all rows"
    if target.template is None and any(s.format != "text" for s in data.sources):
        raise UserError.single(
            "TARGET", f"{target.path} has no chat template to render conversations with: evaluate a run "
            "directory, or a model whose tokenizer has a chat template",
        )

    try:
        prepared = build_datasets(data, target.tokenizer, target.template, seed=seed, batch_size=batch)
    except UserError as exc:
        if data_path is None:
            raise
        # The pipeline names recipe keys; here the source is the --data flag, and what eval cannot
        # set (format, columns, roles) becomes what it can do.
        raise UserError([Problem(_flag_name(p.where), _eval_advice(p, data, recipe is not None))
                         for p in exc.problems]) from None
    if data_path is None and split == "validation":
        if prepared.val is None:
            raise UserError.single(
                "--split", "the recipe holds out no validation rows (data.val_size is 0): use --split train or --data FILE"
            )
        dataset, where = prepared.val, f"validation split of {target.path}"
    else:
        dataset = prepared.train
        where = f"train split of {target.path}" if data_path is None else data_path
    rows = _unique_rows(dataset, data.split_block)
    if max_samples is not None:
        rows = rows[:max_samples]
    if not rows:
        raise UserError.single("--data", f"no rows to evaluate in {where}")
    text_only = target.template is None
    return EvalRows(rows, f"{where} ({len(rows)} rows)", has_replies=not text_only)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError.single("--split", f"{split!r} is not a split of the recipe's data: use one of {', '.join(SPLITS)}")


def _flag_name(where: str) -> str:
    for key in ("data.sources[0].path", "data.sources[0].format", "data.sources[0].columns", "data.sources[0].roles",
                "data.sources[0]"):
        if where.startswith(key):
            return "--data" + where[len(key):]
    return where


# Where the data pipeline's messages turn from what is wrong to the recipe key that fixes it
# (format:, columns:, roles:), none of which `qlora eval` can set.
_RECIPE_ADVICE = re.compile(
    r": use format: |\. Map your column names|\. Say what each becomes|(?:,| \(or) map it with (?:the source's )?roles:"
)


def _eval_advice(problem: Problem, data, from_run: bool) -> str:
    """A data problem's message with eval's own way instead of a recipe key eval cannot set."""
    keyed = problem.where.startswith(("data.sources[0].format", "data.sources[0].columns", "data.sources[0].roles"))
    cut = _RECIPE_ADVICE.search(problem.message)
    if not keyed and cut is None:
        return problem.message
    from qlora_cli.data.formats import FIELDS

    source = data.sources[0]
    fields = ", ".join(source.columns.get(f, f) for f in FIELDS[source.format])
    roles = f" and roles {dict(source.roles)}" if source.roles else ""
    how = "as the run read its first source" if from_run else "in the format its first row suggests"
    fact = problem.message[:cut.start()] if cut else problem.message
    return (f"{fact}. qlora eval reads --data {how}: {source.format} rows with {fields}{roles}. Give --data a file "
            "in that format" + (", or leave out --data to score the run's validation split" if from_run else ""))


def _data_section_for(target, data_path: str, split: str | None):
    """A data section reading DATA_PATH the way the run read its first source (format, columns, roles)."""
    from qlora_cli.recipe.schema import DataSection, DataSource

    if target.recipe is not None:
        first = target.recipe.data.sources[0]
        source = first.model_copy(update={"path": data_path, "split": split or "train", "weight": None, "samples": None})
        # A broken row in an eval file is an error, not a skip: the scores would silently cover fewer rows.
        return target.recipe.data.model_copy(update={
            "sources": [source], "val_sources": [], "val_size": 0, "train_on_inputs": False, "on_bad_row": "error",
        })
    from pathlib import Path

    from qlora_cli.data.sources import is_hub_id

    if not is_hub_id(data_path) and not any(c in data_path for c in "*?[") and not Path(data_path).expanduser().exists():
        raise UserError.single("--data", f"data file not found: {data_path}")
    fmt = _guess_format(str(Path(data_path).expanduser()), data_path)
    if fmt is None:
        raise UserError.single(
            "--data", f"cannot tell the format of {data_path}: give a .txt file, or JSON/JSONL rows with "
            "'messages', 'conversations', 'instruction'/'output', 'prompt'/'completion' or 'text'",
        )
    return DataSection(sources=[DataSource(path=data_path, format=fmt, split=split or "train")], val_size=0,
                       on_bad_row="error", cache=False)


def _guess_format(path: str, given: str) -> str | None:
    """The format of a local JSON/JSONL file without a recipe, from its first row's fields."""
    import json
    from pathlib import Path

    from qlora_cli.data.sources import MAX_JSON_DEPTH, deep_json_lines

    p = Path(path)
    if p.suffix.lower() == ".txt":
        return "text"
    if not p.is_file():
        return None
    with open(p, encoding="utf-8", errors="replace") as f:
        start = f.read(1 << 20)
    head = start.lstrip()
    array = head.startswith("[")
    text = head if array else next(iter(head.splitlines()), "")
    # Bounded before parsing, as the pipeline bounds every data file: json.loads raises
    # RecursionError past about 1,000 levels. (An array of rows is a level itself.)
    deep = deep_json_lines(text.encode(), one_value=True, limit=MAX_JSON_DEPTH + array)
    if deep:
        line = min(deep) + start[: len(start) - len(head)].count("\n")  # after the blank lines stripped
        raise UserError.single(
            "--data", f"{given} line {line}: a value is nested more than {MAX_JSON_DEPTH} levels deep (real rows "
            "nest a few): fix or remove that row",
        )
    try:
        first = json.loads(text)[0] if array else json.loads(text)
    except (ValueError, IndexError):
        return None
    if not isinstance(first, dict):
        return None
    for fmt, keys in (("messages", {"messages"}), ("sharegpt", {"conversations"}), ("alpaca", {"instruction", "output"}),
                      ("prompt_completion", {"prompt", "completion"}), ("text", {"text"})):
        if keys <= first.keys():
            return fmt
    return None


def _unique_rows(dataset, block: int | None = None) -> list[dict]:
    """Rows in dataset order, each (file, row) once: a weighted source repeats rows in training.

    With `block` (on_too_long: split), a long document becomes the max_seq_len blocks training saw
    (TRL's bfd_split cuts at the same places; the pipeline already masked each block's first label)."""
    seen, rows = set(), []
    for r in dataset.select_columns(["input_ids", "labels", "source", "file", "row"]):
        key = (r["source"], r["file"], r["row"])
        if key not in seen:
            seen.add(key)
            step = block or len(r["input_ids"])
            rows.extend({"input_ids": r["input_ids"][i:i + step], "labels": r["labels"][i:i + step]}
                        for i in range(0, len(r["input_ids"]), step))
    return rows


def last_reply(row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference reply ids) for the row's last trained span.

    The last run of labelled tokens is the final reply plus its stop token; everything before it
    is the prompt, tokenized exactly as in training.
    """
    labels = row["labels"]
    end = max(i for i, t in enumerate(labels) if t != -100) + 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return row["input_ids"][:start], row["input_ids"][start:end]


# --- Scoring ---------------------------------------------------------------------------------


@torch.no_grad()
def score_tokens(target, rows: list[dict], batch_size: int, adapter: str | None = None, console=None) -> dict:
    """Token-weighted loss, perplexity and argmax accuracy over the response tokens (progress on `console`)."""
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    model, device = target.model, next(target.model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))  # similar lengths batch together
    nll, correct, tokens = 0.0, 0, 0
    start = time.perf_counter()
    with using_adapter(target, adapter), batch_progress(console, "scoring", len(rows)) as advance:
        for b in range(0, len(order), batch_size):
            batch = [rows[i] for i in order[b : b + batch_size]]
            # Right-padded, as training batches are (left padding would shift the positions).
            padded = target.tokenizer.pad([{"input_ids": r["input_ids"]} for r in batch], padding_side="right",
                                          return_tensors="pt").to(device)
            labels = pad_sequence([torch.tensor(r["labels"]) for r in batch], batch_first=True,
                                  padding_value=-100).to(device)
            logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
            targets = labels[:, 1:]
            scored = targets != -100
            picked, wanted = logits[scored].float(), targets[scored]
            nll += F.cross_entropy(picked, wanted, reduction="sum").item()
            correct += (picked.argmax(-1) == wanted).sum().item()
            tokens += int(scored.sum())
            advance(len(batch))
    seconds = time.perf_counter() - start
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows past ~709
        "token_accuracy": correct / tokens,
        "response_tokens": tokens,
        "loss_samples_per_s": len(rows) / seconds,
    }


def score_generations(target, rows: list[dict], batch_size: int, max_new_tokens: int | None,
                      adapter: str | None = None, console=None) -> tuple[dict, list[dict]]:
    """Greedy answers to each row's last prompt: exact match and ROUGE-L F1 against the reference."""
    from rouge_score import rouge_scorer

    tok = target.tokenizer
    pairs = [last_reply(r) for r in rows]
    references = [tok.decode(ref, skip_special_tokens=True).strip() for _, ref in pairs]
    if max_new_tokens is None:
        max_new_tokens = max(len(ref) for _, ref in pairs) + GENERATION_MARGIN
    sampling = Sampling(greedy=True, max_new_tokens=max_new_tokens)
    order = sorted(range(len(rows)), key=lambda i: -len(pairs[i][0]))  # less left padding per batch
    answers: list = [None] * len(rows)
    start = time.perf_counter()
    with batch_progress(console, "generating", len(rows)) as advance:
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            for i, c in zip(chunk, complete_batch(target, [pairs[i][0] for i in chunk], sampling, adapter)):
                answers[i] = c
            advance(len(chunk))
    seconds = time.perf_counter() - start

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    predictions = []
    for i, (ref, c) in enumerate(zip(references, answers)):
        predictions.append({
            "row": i,
            "prompt": tok.decode(pairs[i][0], skip_special_tokens=False),
            "reference": ref,
            "completion": c.text,
            "exact_match": _normalise(c.text) == _normalise(ref),
            "rouge_l": scorer.score(ref, c.text)["rougeL"].fmeasure,
            "stopped": c.stopped,
        })
    n = len(predictions)
    return {
        "exact_match": sum(p["exact_match"] for p in predictions) / n,
        "rouge_l": sum(p["rouge_l"] for p in predictions) / n,
        "stopped": sum(p["stopped"] for p in predictions) / n,
        "max_new_tokens": max_new_tokens,
        "generate_samples_per_s": n / seconds,
    }, predictions


def _normalise(text: str) -> str:
    return " ".join(text.split())


PROGRESS_LINES = 10  # off a terminal: about this many progress lines per pass


@contextmanager
def batch_progress(console, what: str, total: int):
    """Yield advance(n): progress of one pass over `total` rows, on `console` (the CLI's stderr, so
    --json keeps stdout pure JSON). On a terminal, a rich progress bar that goes away when done; off
    one (a log file, CI), a plain line every ~1/PROGRESS_LINES of the rows; with no console, nothing.
    A real model on a busy CPU takes an hour here: silence looks like a hang."""
    if console is None:
        yield lambda n: None
        return
    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn(what), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("rows  ETA"),
                      TimeRemainingColumn(), console=console, transient=True) as progress:
            task = progress.add_task(what, total=total)

            def advance(n: int) -> None:
                progress.advance(task, n)
                progress.refresh()  # now, not at the next tick: a batch takes seconds, a redraw nothing

            yield advance
        return
    start, done, every = time.perf_counter(), 0, max(1, math.ceil(total / PROGRESS_LINES))
    next_line = every

    def advance(n: int) -> None:
        nonlocal done, next_line
        done += n
        if done >= next_line or done == total:
            next_line = done + every
            console.print(f"{what} {done}/{total} rows ({time.perf_counter() - start:.0f} s)", highlight=False)

    yield advance


def evaluate(target, data: EvalRows, batch_size: int, max_new_tokens: int | None = None,
             generate: bool = True, adapter: str | None = None, console=None) -> tuple[dict, list[dict]]:
    """Every metric for one model (the target as loaded, or `adapter=BASE` for the bare base)."""
    target.model.eval()
    metrics = score_tokens(target, data.rows, batch_size, adapter, console=console)
    predictions: list[dict] = []
    if generate and data.has_replies:
        gen, predictions = score_generations(target, data.rows, batch_size, max_new_tokens, adapter, console=console)
        metrics.update(gen)
    return metrics, predictions


# --- The command ---------------------------------------------------------------------------------


def run_eval(target_path: str, data_path: str | None = None, split: str | None = None, compare_base: bool = False,
             max_samples: int | None = None, batch_size: int | None = None, max_new_tokens: int | None = None,
             generate: bool = True, console=None, trust_remote_code: bool = False) -> dict:
    """Evaluate TARGET (and its bare base with compare_base), write eval_results.json, return the results."""
    from qlora_cli.infer.eval_results import write_results
    from qlora_cli.infer.target import load_target, original_base

    if split is not None and data_path is None:
        check_split(split)  # before loading any model
    target = load_target(target_path, trust_remote_code=trust_remote_code)
    if target.kind == "run" and target.recipe.train.method != "sft" and data_path is None:
        from qlora_cli.infer.preference_eval import run_preference_eval  # reward accuracy and margin on pairs

        return run_preference_eval(target, split, compare_base, max_samples, batch_size, console)
    if compare_base and target.kind == "base":
        raise UserError.single("--compare-base", f"{target_path} is a base model already: give a run or merged directory")
    if compare_base and target.kind == "merged" and target.recipe is None:
        raise UserError.single(
            "--compare-base", f"{target_path} has no merge_report.json naming its run, so its base is unknown",
        )
    data = eval_rows(target, data_path, split, max_samples)
    batch_size = batch_size or (target.recipe.train.batch_size if target.recipe is not None else 8)
    say = console.print if console is not None else (lambda *a, **k: None)

    say(f"evaluating {target.kind} {target.path} on {data.description}")
    metrics, predictions = evaluate(target, data, batch_size, max_new_tokens, generate, console=console)
    base_metrics, base_label = None, None
    if compare_base:
        max_new_tokens = metrics.get("max_new_tokens", max_new_tokens)  # the same budget for both
        if target.kind == "run":
            base_label = "base (4-bit, no adapter)"
            say(f"evaluating the {base_label}")
            base_metrics, _ = evaluate(target, data, batch_size, max_new_tokens, generate, adapter=BASE, console=console)
        else:
            base_label = "base (original weights)"
            say(f"evaluating the {base_label} {target.recipe.model.name_or_path}")
            target.model = None  # one model in memory at a time
            base_metrics, _ = evaluate(original_base(target), data, batch_size, max_new_tokens, generate,
                                       console=console)

    results = {
        "target": target.path,
        "kind": target.kind,
        "data": data.description,
        "rows": len(data.rows),
        "batch_size": batch_size,
        "metrics": metrics,
        "base": base_label and {"label": base_label, "metrics": base_metrics},
        "delta": base_metrics and {k: metrics[k] - base_metrics[k] for k in DELTA_KEYS if k in metrics},
    }
    if target.kind != "base":
        written = write_results(target.path, results, predictions)
        results["written"] = written
    return results


# Metrics where adapter - base means something (speeds and budgets are left out).
DELTA_KEYS = ("loss", "perplexity", "token_accuracy", "exact_match", "rouge_l", "stopped")
