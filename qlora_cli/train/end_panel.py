"""The panel `qlora train` ends with: what was trained, on what, how it went, where it is, what next."""

from __future__ import annotations

import shlex

from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from qlora_cli.data.report import data_losses
from qlora_cli.outputs.run_dir import segments_text


def next_commands(run_dir: str) -> list[str]:
    run = shlex.quote(str(run_dir))
    return [
        f"qlora eval {run}",
        f'qlora generate {run} --prompt "..."',
        f"qlora merge {run}",
    ]


def render_summary_panel(summary: dict, recipe, run_dir: str) -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    lora, data = recipe.lora, summary.get("data", {})
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    total = summary.get("total_params") or 0
    share = f" ({summary['trainable_params'] / total:.2%} of {total:,})" if total else ""
    table.add_row("trained", escape(f"{recipe.model.name_or_path}, 4-bit {recipe.quant.quant_type}; LoRA r={lora.r} "
                                    f"alpha={lora.alpha:g} on {targets}; {summary['trainable_params']:,} trainable{share}"))
    batching = data.get("trained_batches", {})
    key = "packing_efficiency" if batching.get("packed") else "padding_efficiency"
    efficiency = data.get("batching", {}).get(key)
    if lost := data_losses(data, recipe.data.max_seq_len):
        table.add_row("[yellow]not trained[/]", escape(lost))
    table.add_row("data", escape(
        f"{data.get('train_rows', 0):,} train / {data.get('val_rows', 0):,} validation rows, "
        f"{data.get('train_tokens', 0):,} tokens per epoch"
        + (f", {efficiency:.1%} real tokens per batch ({'packed' if batching.get('packed') else 'padded'})"
           if efficiency is not None else "")
    ))
    dist = summary.get("distributed", {})
    if dist.get("world_size", 1) > 1:
        same = {True: ", replicas identical", False: ", REPLICAS DIFFER"}.get(dist.get("replicas_identical"), "")
        table.add_row("processes", escape(
            f"{dist['world_size']} ({dist['strategy']}); global batch {dist['global_batch']} rows per optimizer step{same}"
        ))
    speed = summary.get("throughput", {})
    rate = f" ({speed['tokens_per_s']:,.0f} tokens/s" if speed.get("tokens_per_s") else ""
    if rate and summary.get("device") == "cuda" and speed.get("model_tflops"):
        rate += f", {speed['model_tflops']:.1f} model TFLOP/s"  # meaningful against a GPU's peak only
    rate += ")" if rate else ""
    table.add_row("results", escape(
        f"{summary['steps']} steps in {summary['runtime_s']:.1f}s{segments_text(summary)}{rate}; train loss {_g(summary.get('first_train_loss'))} "
        f"→ {_g(summary.get('last_train_loss'))}; eval loss {_g(summary.get('first_eval_loss'))} → "
        f"{_g(summary.get('eval_loss'))} (the trainer's mean over batches; `qlora eval` weighs every response "
        f"token equally); peak memory {_memory(summary.get('peak_memory', {}))}"
    ))
    from qlora_cli.outputs.preference_figures import preference_line

    if line := preference_line(summary.get("preference")):  # DPO, ORPO, KTO: the method's own figures
        table.add_row("preference", escape(line))
    weights = summary.get("model_memory") or {}
    if weights.get("measured_bytes"):
        table.add_row("4-bit model", escape(
            f"{weights['measured_bytes'] / 2**20:,.2f} MiB measured vs {weights['theoretical_bytes'] / 2**20:,.2f} MiB "
            f"in theory ({weights['bits_per_quantized_param']:.3f} bits per quantized weight)"
            + (f"; {weights['block_weights_4bit_fraction']:.1%} of the transformer blocks' weights in 4 bits"
               if "block_weights_4bit_fraction" in weights else "")
        ))
    table.add_row("files", escape(f"{run_dir}/  (adapter, tokenizer, recipe.yaml, metrics.jsonl, loss.png, README.md)"))
    table.add_row("next", "\n".join(escape(c) for c in next_commands(run_dir)))
    return Panel(table, title="[green]qlora train: done[/]", title_align="left", expand=False)


def _g(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _memory(peak: dict) -> str:
    if "gpu_allocated_gib" in peak:
        return f"{peak['gpu_allocated_gib']:.2f} GiB GPU"
    return f"{peak.get('cpu_rss_gib', 0):.2f} GiB RSS"

