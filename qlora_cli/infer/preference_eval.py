"""`qlora eval` on a preference run (train.method dpo, orpo, kto): how well the adapter ranks the chosen
reply above the rejected one on held-out pairs, beside the usual loss on the chosen replies.

For each pair, the summed log-probability of each reply's scored tokens (exactly the tokens training
scored: data/preference.py) under the run, under its reference and, with --compare-base, under the
bare 4-bit base:
  - reward accuracy and margin: DPO's implicit reward, beta x (log p_run - log p_ref), of chosen minus
    rejected; the share of pairs where it is positive, and its mean. The reference is the one the run
    trained against: the base (adapter disabled) for a fresh adapter, the starting adapter (model.adapter,
    loaded beside the trained one) for a run continued from SFT.
  - log-prob accuracy and margin: the same without the reference, log p(chosen) - log p(rejected) under
    the model alone: the preference a model states by itself, which the base has too.
  - loss, perplexity and token accuracy on the chosen replies, as `qlora eval` reports for SFT.
"""

from __future__ import annotations

import torch

from qlora_cli.errors import UserError

REFERENCE = "qlora_reference"  # the starting adapter's name while it is loaded beside the trained one


def pair_rows(target, split: str, max_samples: int | None) -> tuple[list[dict], str]:
    """The run's preference pairs of SPLIT (validation by default), as its training rendered them."""
    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.infer.evaluate import check_split

    recipe = target.recipe
    check_split(split)
    prepared = build_preference_datasets(recipe.data, target.tokenizer, target.template, seed=recipe.train.seed,
                                         method="dpo" if recipe.train.method == "kto" else recipe.train.method)
    if split == "validation":
        if prepared.val is None:
            raise UserError.single("--split", "the recipe holds out no validation pairs (data.val_size is 0): use "
                                   "--split train")
        ds, where = prepared.val, f"validation pairs of {target.path}"
    else:
        ds, where = prepared.train, f"training pairs of {target.path}"
    # Cut to max_seq_len as TRL's collator cut them in training (keeping the start): the figures are
    # those of the tokens training scored, and no position lies beyond the model's context.
    limit = recipe.data.max_seq_len
    rows = [{**r, "chosen_ids": r["chosen_ids"][: limit - len(r["prompt_ids"])],
             "rejected_ids": r["rejected_ids"][: limit - len(r["prompt_ids"])]} for r in ds if "chosen_ids" in r]
    if not rows:
        raise UserError.single("--split", f"{where}: no chosen/rejected pairs (unpaired KTO rows have no pair to rank)")
    return rows[:max_samples] if max_samples else rows, where


@torch.no_grad()
def reply_logps(target, rows: list[dict], batch_size: int, adapter: str | None) -> torch.Tensor:
    """(pairs, 2): summed log-probabilities of the chosen and rejected reply tokens (rows already cut to
    max_seq_len, as training scored them)."""
    from torch.nn.utils.rnn import pad_sequence

    from qlora_cli.infer.generate import using_adapter

    model, device = target.model, next(target.model.parameters()).device
    sequences = [(r["prompt_ids"], r[key]) for r in rows for key in ("chosen_ids", "rejected_ids")]
    out = torch.zeros(len(sequences), dtype=torch.float64)
    model.eval()
    with using_adapter(target, adapter):
        for b in range(0, len(sequences), batch_size):
            batch = sequences[b : b + batch_size]
            ids = [torch.tensor(p + c) for p, c in batch]
            labels = [torch.tensor([-100] * len(p) + c) for p, c in batch]
            input_ids = pad_sequence(ids, batch_first=True, padding_value=target.tokenizer.pad_token_id or 0)
            mask = pad_sequence([torch.ones(len(i), dtype=torch.long) for i in ids], batch_first=True)
            labels = pad_sequence(labels, batch_first=True, padding_value=-100)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            targets = labels[:, 1:].to(device)
            scored = targets != -100
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out[b : b + len(batch)] = (logp * scored).sum(-1).double().cpu()
    return out.view(-1, 2)


def pair_figures(logps: torch.Tensor, ref: torch.Tensor | None, beta: float) -> dict:
    margin = logps[:, 0] - logps[:, 1]
    figures = {
        "logp_accuracy": float((margin > 0).double().mean()),
        "logp_margin": float(margin.mean()),
        "logps_chosen": float(logps[:, 0].mean()),
        "logps_rejected": float(logps[:, 1].mean()),
    }
    if ref is not None:
        rewards = beta * (logps - ref)
        reward_margin = rewards[:, 0] - rewards[:, 1]
        figures.update(reward_accuracy=float((reward_margin > 0).double().mean()),
                       reward_margin=float(reward_margin.mean()),
                       rewards_chosen=float(rewards[:, 0].mean()), rewards_rejected=float(rewards[:, 1].mean()))
    return figures


def run_preference_eval(target, split: str | None, compare_base: bool, max_samples: int | None,
                        batch_size: int | None, console=None) -> dict:
    """Every figure for a preference run, written to RUN/eval_results.json like `qlora eval`'s."""
    from qlora_cli.infer.eval_results import write_results
    from qlora_cli.infer.evaluate import score_tokens
    from qlora_cli.infer.generate import BASE

    recipe = target.recipe
    if target.kind != "run":
        raise UserError.single("TARGET", f"{target.path} is not a run directory: preference figures need the run's "
                               "adapter and its reference")
    rows, where = pair_rows(target, split or "validation", max_samples)
    batch_size = batch_size or recipe.train.batch_size
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"evaluating {target.path} on {where} ({len(rows)} pairs)")
    reference = BASE
    if recipe.model.adapter:  # trained against the starting adapter: load it beside the trained one
        from qlora_cli.model.adapter import adapter_path

        target.model.load_adapter(str(adapter_path(recipe.model.adapter)), adapter_name=REFERENCE)
        reference = REFERENCE
    run = reply_logps(target, rows, batch_size, adapter="default" if reference == REFERENCE else None)
    ref = reply_logps(target, rows, batch_size, adapter=reference)
    metrics = pair_figures(run, ref, recipe.preference.beta)
    chosen = [{"input_ids": r["prompt_ids"] + r["chosen_ids"], "labels": [-100] * len(r["prompt_ids"]) + r["chosen_ids"]}
              for r in rows]
    metrics.update(score_tokens(target, chosen, batch_size, "default" if reference == REFERENCE else None))
    base = None
    if compare_base:
        say("evaluating the base (4-bit, no adapter)")
        base = pair_figures(ref if reference == BASE else reply_logps(target, rows, batch_size, BASE), None,
                            recipe.preference.beta)
        base.update(score_tokens(target, chosen, batch_size, BASE))
    keys = ("logp_accuracy", "logp_margin", "loss", "perplexity", "token_accuracy")
    results = {
        "target": target.path, "kind": target.kind, "data": f"{where} ({len(rows)} pairs)", "rows": len(rows),
        "batch_size": batch_size, "method": recipe.train.method, "beta": recipe.preference.beta,
        "reference": "base (adapter disabled)" if reference == BASE else f"starting adapter {recipe.model.adapter}",
        "metrics": metrics,
        # The model before this run's training (its reference): the same pairs' log-prob figures.
        "reference_metrics": pair_figures(ref, None, recipe.preference.beta),
        "base": base and {"label": "base (4-bit, no adapter)", "metrics": base},
        "delta": base and {k: metrics[k] - base[k] for k in keys},
    }
    results["written"] = write_results(target.path, results, [])
    return results


def render_preference_table(results: dict):
    from rich.table import Table

    table = Table(title=f"{results['method']} run on {results['data']}; reference: {results['reference']}")
    table.add_column("metric")
    table.add_column("run", justify="right")
    base = (results.get("base") or {}).get("metrics")
    if base:
        table.add_column("base", justify="right")
        table.add_column("delta", justify="right")
    ref = results.get("reference_metrics") or {}
    if ref:
        table.caption = ("before training (the reference): log-prob accuracy "
                         f"{ref['logp_accuracy']:.4g}, log-prob margin {ref['logp_margin']:.4g}")
    for key, value in results["metrics"].items():
        if key.endswith("_per_s"):
            continue
        row = [key, f"{value:.4g}"]
        if base:
            row += [f"{base[key]:.4g}" if key in base else "", f"{value - base[key]:+.4g}" if key in base else ""]
        table.add_row(*row)
    return table
