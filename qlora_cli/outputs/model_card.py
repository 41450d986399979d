"""RUN/README.md: a model card that says what was trained, how well, and how to load it; and
MERGED/README.md, the merged model's: what was folded into what, and how faithfully.

PEFT's save_pretrained writes a generic template full of "More Information Needed"; these are
filled from the run's own recipe and summary (and the merge report), so they stay true without
anyone editing them.
"""

from __future__ import annotations

from qlora_cli.data.report import data_losses
from qlora_cli.outputs.run_dir import MODEL_CARD, segments_text
from qlora_cli.util.files import write_atomically


def front_matter(library: str, base_model: str, tags: list[str]) -> str:
    """The card's YAML metadata block, as the hub reads it (huggingface_hub writes and quotes it)."""
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(library_name=library, base_model=base_model, tags=tags).to_yaml()}\n---"


def render_model_card(recipe, summary: dict, run_name: str) -> str:
    # A local base by its absolute path, as in recipe.yaml: the snippet works from any directory.
    recipe = recipe.with_absolute_paths()
    m, q, lora, t = recipe.model, recipe.quant, recipe.lora, recipe.train
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    sources = ", ".join(f"`{s.path}` ({s.format})" for s in recipe.data.sources)
    data = summary.get("data", {})

    def num(key, fmt="{:.4g}"):
        value = summary.get(key)
        return "n/a" if value is None else fmt.format(value)

    share = summary["trainable_params"] / summary["total_params"] if summary.get("total_params") else 0
    return f"""{front_matter("peft", m.name_or_path, ["qlora", "lora", "peft", "trl", "sft"])}

# {run_name}

A LoRA adapter for `{m.name_or_path}`, trained with QLoRA by `qlora train`: the base model was
held in 4-bit {q.quant_type.upper()}{' with double quantization' if q.double_quant else ''}, with {q.compute_dtype} compute.

## Training

| | |
|---|---|
| LoRA | r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, on {targets}{', DoRA' if lora.use_dora else ''}{', rsLoRA' if lora.use_rslora else ''} |
| trained in full | {', '.join(lora.modules_to_save) or 'nothing'} |
| trainable parameters | {summary['trainable_params']:,} ({share:.2%} of {summary.get('total_params', 0):,}) |
| data | {sources}; {data.get('train_rows', 'n/a')} train / {data.get('val_rows', 'n/a')} validation rows; template `{summary.get('template')}`; max_seq_len {recipe.data.max_seq_len} |
| not trained | {data_losses(data, recipe.data.max_seq_len) or "nothing: every example was trained whole"} |
| schedule | {summary['steps']} steps, batch {t.batch_size} × {t.gradient_accumulation_steps} accumulation, lr {t.learning_rate:g} ({t.lr_scheduler}), {t.optimizer}, seed {t.seed} |

## Results

| | |
|---|---|
| train loss, first → last | {num('first_train_loss')} → {num('last_train_loss')} |
| eval loss, before → after | {num('first_eval_loss')} → {num('eval_loss')} (the trainer's mean over validation batches; `qlora eval` reports the mean per response token) |
| runtime | {num('runtime_s', '{:.1f}')} s{segments_text(summary)} on {summary.get('device')} |
{_preference_row(summary)}
The full recipe is in `recipe.yaml`, every logged step in `metrics.jsonl`, and the curves in `loss.png`.

## Use

{load_snippet(recipe, run_name)}

Or with this tool: `qlora generate {run_name} --prompt "..."`, `qlora eval {run_name}`, and
`qlora merge {run_name}` for a standalone model.
"""


def load_snippet(recipe, run_name: str) -> str:
    """Python that loads the run as training held it: the same 4-bit settings (built by
    modeling.build_bnb_config, so the two cannot drift), dtype and adapter. Runs as written on
    any machine, CPUs with AVX512-BF16 included (see the comment it carries)."""
    from qlora_cli.model.load import build_bnb_config

    bnb = build_bnb_config(recipe.quant)
    name = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    return f'''```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

tokenizer = AutoTokenizer.from_pretrained("{run_name}")          # carries the training chat template
base = AutoModelForCausalLM.from_pretrained(
    "{recipe.model.name_or_path}",
    dtype=torch.{recipe.model.dtype},
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="{bnb.bnb_4bit_quant_type}",
        bnb_4bit_use_double_quant={bnb.bnb_4bit_use_double_quant},
        bnb_4bit_compute_dtype=torch.{name(bnb.bnb_4bit_compute_dtype)},
        bnb_4bit_quant_storage=torch.{name(bnb.bnb_4bit_quant_storage)},
    ),
)
# bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16 at the first forward without
# gradients, and then fails on layer shapes its packing does not divide; training kept the
# standard layout, and so does this (it changes nothing elsewhere).
for module in base.modules():
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
model = PeftModel.from_pretrained(base, "{run_name}")
```'''


def write_model_card(run, recipe, summary: dict) -> None:
    write_atomically(run / MODEL_CARD, render_model_card(recipe, summary, str(run.path)))


def render_merge_card(report: dict, output: str) -> str:
    """The merged model's README.md, from its merge_report.json: base, run, and the fidelity
    figures beside the precision floor they are judged against."""
    fid = report.get("fidelity")
    if fid is None:
        fidelity = "Not checked (`qlora merge --no-verify`)."
    else:
        rows = [(f"merged model ({mode} base){'' if mode == report['base'] else ', in memory only'}", r)
                for mode, r in fid["results"].items()]
        floor = fid.get("floor")
        if floor is not None:
            rows.append((f"precision floor ({floor['dtype']})", floor))
        table = "\n".join(
            f"| {name} | {100 * r['top1_agreement']:.2f}% | {r['mean_kl']:.3g} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['positions']:,} |" for name, r in rows
        )
        verdict = f"**Warning:** {report['warning']}." if report.get("warning") else (
            "The merged model is within the precision floor: it is the model the adapter made, up to rounding."
        )
        means = f"\n\nThe precision floor is {floor['means']}; the merge is judged against it." if floor else ""
        fidelity = f"""Next-token predictions of this model against the adapter on the 4-bit base (as `qlora generate` loads it),
on {fid['prompts']}:

| | top-1 agreement | mean KL | max \\|logit diff\\| | positions |
|---|---|---|---|---|
{table}{means}

{verdict}"""
    return f"""{front_matter("transformers", report['base_model'], ["qlora", "lora", "merged"])}

# {output}

`{report['base_model']}` with the {report['adapter']['kind']} adapter of the run `{report['run_dir']}` folded in
by `qlora merge` ({report['base']} base, {report['dtype']}): a standalone model, no PEFT needed.

## Fidelity

{fidelity}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{output}")   # the run's chat template, in plain Jinja
model = AutoModelForCausalLM.from_pretrained("{output}")
```

`generation_config.json` stops on the template's end of turn. Every figure above is in `merge_report.json`.
"""


def _preference_row(summary: dict) -> str:
    """A DPO/ORPO/KTO run's figures as one more Results row (nothing for SFT)."""
    from qlora_cli.outputs.preference_figures import preference_line

    line = preference_line(summary.get("preference"))
    return f"| preference | {line} |\n" if line else ""
