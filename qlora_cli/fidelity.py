"""How closely one model's next-token predictions follow another's, on the same token sequences.

    prompts, source = probe_sequences(recipe, run_dir)      # the run's eval rows, or built-ins
    reference = next_token_logits(adapter_model, prompts)   # computed once, kept on the CPU
    report = compare(reference, next_token_logits(merged_model, prompts))
    report -> {"max_abs_logit_diff", "mean_kl", "top1_agreement", "positions"}

Every position of every sequence counts: a merge that is right on prompts but wrong on the
response tokens (or the other way round) shows up either way.
"""

from __future__ import annotations

import torch

BUILT_IN_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a neural network is in one paragraph.",
    "Translate 'good morning' into Spanish.",
    "List the first five prime numbers.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a list in Python?",
]


def probe_sequences(recipe, n: int = 32) -> tuple[list[torch.Tensor], str]:
    """Token sequences to compare on: rows of the run's validation (else training) data, rendered
    and truncated exactly as in training; the built-in prompts through the run's template when
    the data is gone."""
    from qlora_cli.data.pipeline import build_datasets
    from qlora_cli.errors import UserError
    from qlora_cli.train import prepare_tokenizer

    tokenizer, template = prepare_tokenizer(recipe)
    max_len = recipe.data.max_seq_len
    try:
        prepared = build_datasets(recipe.data, tokenizer, template, seed=recipe.train.seed)
    except UserError as exc:
        prepared, why = None, exc.problems[0].render()
    if prepared is not None:
        ds = prepared.val if prepared.val is not None and len(prepared.val) else prepared.train
        rows = ds.select(range(min(n, len(ds))))["input_ids"]
        which = "validation" if ds is prepared.val else "training"
        return [torch.tensor(r[:max_len]) for r in rows], f"{len(rows)} {which} rows of the run's data"
    seqs = []
    for prompt in BUILT_IN_PROMPTS[:n]:
        if template is not None:  # the run's template, as `qlora train` installed it
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt)["input_ids"]
        seqs.append(torch.tensor(ids[:max_len]))
    return seqs, f"{len(seqs)} built-in prompts (the run's data could not be loaded: {why})"


@torch.no_grad()
def next_token_logits(model, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits for every position, one sequence at a time (no padding to get wrong)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=s.unsqueeze(0).to(device)).logits[0].float().cpu() for s in sequences]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> dict:
    """Max |logit difference|, mean KL(reference || candidate) and top-1 agreement over all positions."""
    max_diff, kl_sum, agree, positions = 0.0, 0.0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        max_diff = max(max_diff, (ref - cand).abs().max().item())
        log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
        kl_sum += (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        positions += ref.shape[0]
    return {
        "max_abs_logit_diff": max_diff,
        "mean_kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "positions": positions,
    }


def render_fidelity(report: dict):
    """The merge report's fidelity section as a rich table, one row per merged base."""
    from rich.table import Table

    fid = report["fidelity"]
    table = Table(title=f"merged model vs adapter on the 4-bit base ({fid['prompts']})", title_justify="left")
    for col in ("base", "max |logit diff|", "mean KL", "top-1 agreement", "positions"):
        table.add_column(col, justify="left" if col == "base" else "right")
    for mode, r in fid["results"].items():
        table.add_row(
            mode if mode == report["base"] else f"{mode}*", f"{r['max_abs_logit_diff']:.3g}", f"{r['mean_kl']:.3g}", f"{100 * r['top1_agreement']:.2f}%",
            str(r["positions"]),
        )
    if len(fid["results"]) > 1:
        table.caption = "* merged in memory for comparison, not written"
        table.caption_justify = "left"
    return table
