"""The architecture matrix: every supported family, tiny and random, through qlora end to end.

    python benchmarks/architecture_matrix.py                 # all families, prints the markdown table
    python benchmarks/architecture_matrix.py --family GPT-2 --family Falcon
    python benchmarks/architecture_matrix.py --json out.json # the measured figures as well

For each family a random 2-layer model is built from its transformers config class (no download;
hidden size 64, so every matrix quantizes into whole 64-value NF4 blocks) with the tiny tokenizer of
scripts/build_tiny.py, and then, as tests/test_architectures.py does it:
  1. load: through qlora's own loading path (qlora_cli.model.load.load_base_model), the share of
     the transformer blocks' matrix weights held in 4 bits measured (architectures.quantized_fraction); a
     Mixture-of-Experts model is refused there (its experts cannot be quantized);
  2. train: `qlora train` on the tiny Alpaca data, a few steps (structure, not learning);
  3. reload: the saved adapter on a freshly loaded 4-bit base gives the trained model's logits;
  4. merge: `qlora merge`, whose fidelity check compares the merged model with the adapter on the
     4-bit base (top-1 agreement of next-token predictions, merge_report.json);
  5. generate: greedy replies from the run (adapter) and from the merged model, which must agree.

The functions below are the steps; the test suite calls the same ones and asserts on them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# Shared by every family: 2 layers, hidden 64 (4 heads of 16), MLP 128.
DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
GQA = dict(DENSE, num_key_value_heads=2)

# family -> (transformers config class, its arguments). Head sizes are set where the class's
# default would not follow from hidden_size / num_attention_heads.
FAMILIES: dict[str, tuple[str, dict]] = {
    "Llama": ("LlamaConfig", GQA),
    "Mistral": ("MistralConfig", dict(GQA, head_dim=16)),
    "Qwen2": ("Qwen2Config", GQA),
    "Qwen3": ("Qwen3Config", dict(GQA, head_dim=16)),
    "Gemma": ("GemmaConfig", dict(GQA, head_dim=16)),
    "Gemma 2": ("Gemma2Config", dict(GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)),
    "Gemma 3": ("Gemma3TextConfig", dict(GQA, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)),
    "Phi": ("PhiConfig", DENSE),
    "Phi-3": ("Phi3Config", GQA),
    "Falcon": ("FalconConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    new_decoder_architecture=False, multi_query=True, bias=False)),
    "GPT-NeoX": ("GPTNeoXConfig", DENSE),
    "GPT-2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "OLMo2": ("Olmo2Config", GQA),
    "StableLM": ("StableLmConfig", GQA),
    "Starcoder2": ("Starcoder2Config", GQA),
    "Mixtral": ("MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "Qwen3-MoE": ("Qwen3MoeConfig", dict(GQA, head_dim=16, moe_intermediate_size=64, num_experts=4,
                                         num_experts_per_tok=2, decoder_sparse_step=1)),
}
# Their experts are fused 3-D tensors bitsandbytes cannot quantize: qlora refuses them at load.
MOE = {"Mixtral", "Qwen3-MoE"}
PROMPT = "Count from 3 to 7."
NEW_TOKENS = 8


def build_family(family: str, folder: Path, tokenizer_dir: Path) -> Path:
    """A random FAMILY model saved in FOLDER (safetensors), with the tiny tokenizer beside it.

    The embeddings are sized to the tokenizer as it loads beside this family's config.json:
    transformers picks the tokenizer class by model type, and some classes add a token (Qwen2's
    adds <|endoftext|> as its pad token), which the vocabulary must hold, as a real checkpoint's does.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cls, kwargs = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, cls)(
        **kwargs, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.unk_token_id,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config.vocab_size = max(config.vocab_size, len(AutoTokenizer.from_pretrained(folder)))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def matrix_recipe(model_dir: Path, data: Path, output_dir: Path, max_steps: int = 3) -> dict:
    """configs/tiny.yaml cut down to a few short steps on MODEL_DIR (adapters on every linear layer)."""
    import yaml

    recipe = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    recipe["model"]["name_or_path"] = str(model_dir)
    recipe["data"]["sources"][0]["path"] = str(data)
    recipe["data"].update(max_seq_len=64, val_size=8)
    recipe["lora"].update(r=8, alpha=16, modules_to_save=[])  # structure: the adapters alone
    recipe["train"].update(max_steps=max_steps, batch_size=4, logging_steps=1, eval_steps=None,
                           save_steps=1000, warmup_ratio=0.0)
    recipe["output"]["dir"] = str(output_dir)
    return recipe


def write_recipe(recipe: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_4bit(model_dir: Path):
    """The base through qlora's own loading path. Returns (model, Coverage); raises the UserError
    qlora stops with when too little of the model would be in 4 bits."""
    from qlora_cli.model.architectures import quantized_fraction
    from qlora_cli.recipe.schema import ModelSection, QuantSection
    from qlora_cli.model.load import load_base_model

    quant = QuantSection(quant_type="nf4", double_quant=True, compute_dtype="float32")
    model = load_base_model(ModelSection(name_or_path=str(model_dir), dtype="float32"), quant)
    return model, quantized_fraction(model)


def train_run(recipe_path: Path):
    """`qlora train` in this process (the same function the command calls). Returns TrainResult."""
    from rich.console import Console

    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.train.run import train

    with open(os.devnull, "w") as sink:  # no live display: the matrix prints its own table
        return train(load_recipe(recipe_path), display="quiet", console=Console(file=sink))


def probe_batch(tokenizer):
    """Two prompts of different lengths, left-padded (the padding and the mask are exercised too)."""
    import torch

    ids = tokenizer(["Count from 3 to 7.", "Reverse the order of these words: apple river stone"])["input_ids"]
    width = max(map(len, ids))
    pad = tokenizer.eos_token_id
    return dict(
        input_ids=torch.tensor([[pad] * (width - len(r)) + r for r in ids]),
        attention_mask=torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids]),
    )


def logits(model, batch):
    import torch

    with torch.no_grad():
        out = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
    mask = batch["attention_mask"].bool()
    return out[mask]  # real positions only: what a padded position predicts is not defined


def reload_check(result, batch, expected) -> tuple[float, float]:
    """(max |logit difference| between EXPECTED, the trained model's logits, and its saved adapter
    reloaded on a freshly loaded 4-bit base, max |difference| the adapter makes to the base's logits)."""
    from peft import PeftModel

    from qlora_cli.recipe.load import load_recipe

    base, _ = load_4bit(Path(load_recipe(result.run_dir / "recipe.yaml").model.name_or_path))
    reloaded = PeftModel.from_pretrained(base, str(result.run_dir.path)).eval()
    got = logits(reloaded, batch)
    with reloaded.disable_adapter():
        bare = logits(reloaded, batch)
    return (got - expected).abs().max().item(), (bare - expected).abs().max().item()


def merged_logits(merged_dir: Path, batch):
    """The merged model as plain transformers loads it (full precision, no peft)."""
    import torch
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval(), batch)


def merge_run(run_dir: Path, output: Path) -> dict:
    """`qlora merge` with its fidelity check (the function the command calls). Returns merge_report.json."""
    from qlora_cli.merge.run import merge

    result = merge(run_dir, output=output)
    return json.loads((result.output / "merge_report.json").read_text())


def greedy_reply(target_dir: Path) -> tuple[tuple[list[int], bool], list[int]]:
    """((the greedy reply's token ids as `qlora generate TARGET --prompt ... --greedy` produces it,
    whether it ended on a stop token), NEW_TOKENS greedy tokens with the stop tokens suppressed). A model trained 3 steps often stops
    at once; the second makes every family decode several steps through its cache."""
    import torch

    from qlora_cli.infer.generate import Sampling, complete
    from qlora_cli.infer.target import load_target

    target = load_target(str(target_dir))
    prompt = target.prompt_ids(PROMPT)
    reply = complete(target, prompt, Sampling(max_new_tokens=NEW_TOKENS, greedy=True))
    with torch.no_grad():
        out = target.model.generate(
            input_ids=torch.tensor([prompt], device=target.model.device), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=target.stop_ids,
            pad_token_id=target.tokenizer.pad_token_id,
        )
    return (reply.token_ids, reply.stopped), out[0, len(prompt):].tolist()


@dataclass
class Row:
    family: str
    config_class: str
    fraction: float | None = None  # of the transformer blocks' matrix weights, in 4 bits
    refused: str | None = None  # why qlora stopped at load (MoE)
    steps: int | None = None
    loss: str | None = None
    reload_diff: float | None = None  # trained model vs its adapter reloaded
    adapter_effect: float | None = None  # what the adapter changes in the base's logits
    top1: float | None = None  # merge_report.json: merged model vs adapter on the 4-bit base
    merged_diff: float | None = None  # merged model (plain transformers) vs the trained model
    reply_tokens: int | None = None  # the greedy reply `qlora generate` gives
    reply_stopped: bool | None = None  # ...ended on a stop token (not at NEW_TOKENS)
    forced_tokens: int | None = None  # greedy tokens decoded with the stop suppressed
    reply_matches: bool | None = None  # the merged model's greedy tokens (both kinds) are the adapter's
    error: str | None = None
    seconds: dict = field(default_factory=dict)


def run_family(family: str, work: Path, tiny: Path) -> Row:
    """Every step for one family, measured; a failure is recorded, not raised."""
    import torch

    from qlora_cli.model.architectures import quantized_fraction
    from qlora_cli.recipe.schema import QuantSection
    from qlora_cli.errors import UserError
    from qlora_cli.model.meta import quantized_meta_model

    row = Row(family, FAMILIES[family][0])
    folder = work / family.replace(" ", "_")
    clock = time.perf_counter()

    def lap(step):
        nonlocal clock
        now = time.perf_counter()
        row.seconds[step] = round(now - clock, 1)
        clock = now

    try:
        model_dir = build_family(family, folder / "model", tiny / "model")
        try:
            model, coverage = load_4bit(model_dir)
            row.fraction = coverage.fraction
            del model
        except UserError as exc:
            from transformers import AutoConfig

            row.refused = exc.problems[0].message
            meta = quantized_meta_model(AutoConfig.from_pretrained(model_dir), QuantSection(), torch.float32)
            row.fraction = quantized_fraction(meta).fraction
            lap("load")
            return row
        lap("load")
        recipe = write_recipe(matrix_recipe(model_dir, tiny / "alpaca.jsonl", folder / "run"), folder / "recipe.yaml")
        result = train_run(recipe)
        row.steps, row.loss = result.summary["steps"], _loss(result.summary)
        lap("train")
        batch = probe_batch(result.trainer.processing_class)
        trained = logits(result.trainer.model.eval(), batch)
        row.reload_diff, row.adapter_effect = reload_check(result, batch, trained)
        del result
        gc.collect()
        lap("reload")
        report = merge_run(folder / "run", folder / "merged")
        row.top1 = report["fidelity"]["results"]["dequantized"]["top1_agreement"]
        row.merged_diff = (merged_logits(folder / "merged", batch) - trained).abs().max().item()
        lap("merge")
        adapter, merged = greedy_reply(folder / "run"), greedy_reply(folder / "merged")
        (reply, row.reply_stopped), forced = adapter
        row.reply_tokens, row.forced_tokens, row.reply_matches = len(reply), len(forced), adapter == merged
        lap("generate")
    except Exception as exc:  # noqa: BLE001 - the table says what broke
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    gc.collect()
    return row


def _loss(summary: dict) -> str:
    first, last = summary.get("first_train_loss"), summary.get("last_train_loss")
    if first is None or last is None:
        return "?"
    return f"{first:.2f} → {last:.2f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| family | config class | weights in 4 bits | train | reload | merge fidelity (top-1) | generate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r.family} | `{r.config_class}` | {_pct(r.fraction)}"
        if r.error:
            lines.append(f"{head} | error: {r.error} | | | |")
        elif r.refused:
            lines.append(f"{head}: **refused at load**, experts left in full precision | — | — | — | — |")
        else:
            lines.append(
                f"{head} | {r.steps} steps, loss {r.loss} | same logits (max diff {r.reload_diff:.1g}; "
                f"the adapter moves them {r.adapter_effect:.2g}) | {r.top1:.2%} (merged vs trained logits: max diff "
                f"{r.merged_diff:.1g}) | {r.reply_tokens} token{'s' if r.reply_tokens != 1 else ''}"
                f"{', stop' if r.reply_stopped else ' (limit)'}; {r.forced_tokens} with the stop suppressed; "
                f"merged {'=' if r.reply_matches else '≠'} adapter |"
            )
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only these (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the measured rows here")
    parser.add_argument("--work", type=Path, help="keep the models and runs here (default: a temporary folder)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import build_tiny

    from qlora_cli.cli import _quiet_libraries

    _quiet_libraries()
    work = args.work or Path(tempfile.mkdtemp(prefix="qlora-matrix-"))
    tiny = build_tiny.build(work / "tiny")
    rows, start = [], time.perf_counter()
    for family in args.family or FAMILIES:
        row = run_family(family, work, tiny)
        print(f"{family}: {row.seconds} {row.error or ''}", file=sys.stderr, flush=True)
        rows.append(row)
    total = time.perf_counter() - start
    print(table(rows))
    print(f"\n{len(rows)} families in {total:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"seconds": round(total, 1), "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if not any(r.error for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
