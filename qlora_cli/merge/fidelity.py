"""How closely one model's next-token predictions follow another's, on the same token sequences.

    prompts, source = probe_sequences(recipe, run_dir)      # the run's eval rows, or built-ins
    reference = next_token_logits(adapter_model, prompts)   # computed once, kept on the CPU
    report = compare(reference, next_token_logits(merged_model, prompts))
    report -> {"max_abs_logit_diff", "mean_kl", "top1_agreement", "positions"}
    floor = precision_floor(adapter_model, reference, prompts, model_dtype, compute_dtype, out_dtype)
    judge(report, floor) -> None, or why the merge is measurably worse than the floor

Every position of every sequence counts: a merge that is right on prompts but wrong on the
response tokens (or the other way round) shows up either way.

The precision floor is what arithmetic alone costs on the same rows: the adapter model compared
with itself computed in another precision. A bf16 model cannot agree with anything to 100%: on
SmolLM2-135M-Instruct (bf16, 20 QLoRA steps) the adapter model as loaded agrees with itself in fp32
on 97.88% of 5,807 next tokens, and the correct bf16 merge, which carries a bf16 rounding of its
own, on 97.68%. The merge is judged against that figure, not against 100%.
"""

from __future__ import annotations

import torch

from qlora_cli.util.dtypes import short_name

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
    from qlora_cli.model.tokenizer import prepare_tokenizer

    tokenizer, template = prepare_tokenizer(recipe)
    try:
        prepared = build_datasets(recipe.data, tokenizer, template, seed=recipe.train.seed)
    except UserError as exc:
        prepared, why = None, exc.problems[0].render()
    if prepared is not None:
        ds = prepared.val if prepared.val is not None and len(prepared.val) else prepared.train
        rows = ds.select(range(min(n, len(ds))))["input_ids"]
        which = "validation" if ds is prepared.val else "training"
        return [torch.tensor(r) for r in rows], f"{len(rows)} {which} rows of the run's data"  # cut as in training
    seqs = []
    for prompt in BUILT_IN_PROMPTS[:n]:
        if template is not None:  # the run's template, as `qlora train` installed it
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt)["input_ids"]
        seqs.append(torch.tensor(ids[: recipe.data.max_seq_len]))
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
        kl = torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # KL(p || q) per position
        kl_sum += kl.clamp_min(0).sum().item()
        agree += (ref.argmax(-1) == cand.argmax(-1)).sum().item()
        positions += ref.shape[0]
    return {
        "max_abs_logit_diff": max_diff,
        "mean_kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "positions": positions,
    }


def arithmetic_dtype(model_dtype: torch.dtype, compute_dtype: torch.dtype, out_dtype: torch.dtype) -> torch.dtype | None:
    """The precision to compare the adapter model with, for the floor: fp32 when any of its own
    arithmetic is lower (the unquantized layers in model.dtype, the 4-bit matmuls in
    quant.compute_dtype); when all of it is fp32, the merged model's dtype, whose rounding is then
    the only precision in play; None when that is fp32 too (nothing to measure: the floor is 100%)."""
    if model_dtype != torch.float32 or compute_dtype != torch.float32:
        return torch.float32
    return None if out_dtype == torch.float32 else out_dtype


def set_arithmetic(model, dtype: torch.dtype) -> None:
    """Make MODEL (a PeftModel on a 4-bit base) compute in DTYPE, in place, changing nothing else:
    its unquantized parameters (embeddings, norms, head, adapters) cast to DTYPE and every 4-bit
    layer's matmul run in DTYPE. The 4-bit weights themselves (codes and scales) are untouched:
    bitsandbytes' 4-bit matmul dequantizes them at the precision of its input."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
    for param in model.parameters():
        if param.is_floating_point() and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.to(dtype)




def precision_floor(model, reference: list[torch.Tensor], sequences: list[torch.Tensor], model_dtype: torch.dtype,
                    compute_dtype: torch.dtype, out_dtype: torch.dtype) -> dict:
    """The adapter model (whose logits on SEQUENCES are REFERENCE) against itself computed in
    another precision (arithmetic_dtype): compare()'s figures, plus "dtype" and "means". Changes
    MODEL's precision in place: compute its reference logits first."""
    dtype = arithmetic_dtype(model_dtype, compute_dtype, out_dtype)
    if dtype is None:
        positions = sum(r.shape[0] for r in reference)
        return {"max_abs_logit_diff": 0.0, "mean_kl": 0.0, "top1_agreement": 1.0, "positions": positions,
                "dtype": "fp32", "means": "the adapter model and the merged model both compute in fp32: nothing "
                "but the merge can make them differ"}
    set_arithmetic(model, dtype)
    floor = compare(reference, next_token_logits(model, sequences))
    name = short_name(dtype)
    floor.update(dtype=name, means=f"the adapter model as loaded against itself in {name} throughout: what "
                 "precision alone changes on these rows")
    return floor


# How much worse than the floor a correct merge can look. The floor compares the adapter model with
# itself after one change of precision. The merged model carries a change of its own, independent of
# it (its weights W + scale * B @ A rounded once to the output dtype, its matmuls in that dtype), so
# against the adapter model as loaded two changes stack. Allowing the merged model's own change to be
# up to sqrt(3) times the floor's, the logit difference grows to up to twice the floor's size: top-1
# flips, which happen at near-ties and grow about linearly with the size, to up to 2x the floor's, and
# the mean KL, quadratic in the difference, to up to 4x. (Measured on the bf16 tiny model: a correct
# merge 13 flips and 1.95x the floor's KL; the update scaled by 1.05 instead of 1, 15x the KL.) On top
# of that, sampling noise: flips are counted over a few thousand positions or fewer, so three standard
# deviations of a Poisson count (at least 3 positions, for a floor of 100%); and a mean KL under 1e-5
# is no finding by itself (a correct fp32 merge of the tiny model measures 4e-8, the bf16 tiny
# model's floor 4e-5).
FLIP_FACTOR = 2.0
KL_FACTOR = 4.0
KL_NOISE = 1e-5


def judge(result: dict, floor: dict) -> str | None:
    """Why RESULT (the merged model against the adapter model) is measurably worse than FLOOR, or
    None when precision explains it."""
    positions = result["positions"]
    flips = round((1 - result["top1_agreement"]) * positions)
    floor_flips = (1 - floor["top1_agreement"]) * floor["positions"]
    allowed = FLIP_FACTOR * floor_flips + max(3.0, 3 * (FLIP_FACTOR * floor_flips) ** 0.5)
    reasons = []
    if flips > allowed:
        reasons.append(f"{flips} of {positions} next tokens differ, {floor_flips:.0f} at the precision floor")
    if result["mean_kl"] > KL_FACTOR * floor["mean_kl"] + KL_NOISE:
        reasons.append(f"mean KL {result['mean_kl']:.3g}, {floor['mean_kl']:.3g} at the precision floor")
    return "; ".join(reasons) or None


def render_fidelity(report: dict):
    """The merge report's fidelity section as a rich table: one row per merged base, and the
    precision floor they are judged against."""
    from rich.table import Table

    fid = report["fidelity"]
    floor = fid.get("floor")  # reports written before the floor have none
    table = Table(title=f"merged model vs adapter on the 4-bit base ({fid['prompts']})", title_justify="left")
    for col in ("base", "max |logit diff|", "mean KL", "top-1 agreement", "positions", "verdict"):
        table.add_column(col, justify="left" if col in ("base", "verdict") else "right")

    def figures(r):
        return f"{r['max_abs_logit_diff']:.3g}", f"{r['mean_kl']:.3g}", f"{100 * r['top1_agreement']:.2f}%", str(r["positions"])

    for mode, r in fid["results"].items():
        verdict = "" if "worse_than_floor" not in r else "worse than the floor" if r["worse_than_floor"] else "within the floor"
        table.add_row(mode if mode == report["base"] else f"{mode}*", *figures(r), verdict)
    captions = []
    if floor is not None:
        table.add_row(f"precision floor ({floor['dtype']})", *figures(floor), "", style="dim")
        captions.append(f"precision floor: {floor['means']}")
    if len(fid["results"]) > 1:
        captions.append("* merged in memory for comparison, not written")
    if captions:
        table.caption = "\n".join(captions)
        table.caption_justify = "left"
    return table
