"""Preference tuning (train.method dpo, orpo, kto) with TRL's trainers, under `qlora train`'s guarantees.

    setup = build_preference_trainer(recipe, run)     # what train/run.py's build_trainer is for SFT

What is TRL's and what is ours:
  - The losses, the reference log-probabilities and the figures (rewards/chosen, rewards/rejected,
    rewards/accuracies, rewards/margins, logps/...) are TRL's DPOTrainer, KTOTrainer and (from
    trl.experimental) ORPOTrainer, unchanged.
  - The rows are ours (data/preference.py): pre-tokenized with the run's template exactly as SFT
    renders it, so `_prepare_dataset` is told to leave them as they are.
  - The checkpoints, the non-finite-loss stop, the log window kept across a resume and the
    divergence guard are train/trainer.py's CheckpointingMixin, the same code SFT runs.

The reference costs no second model. TRL, handed a PeftModel and no ref_model, adds a frozen copy of
the starting adapter named "ref" and computes the reference log-probabilities through it: for a fresh
adapter (B = 0) that is exactly the base; for a run continued from SFT (model.adapter) it is the SFT
model, which is DPO's reference by definition. The copy is adapter-sized (a few MB on a 7B model); the
4-bit base is loaded once. Only the trained adapter ("default") is written to the run directory.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer, KTOTrainer

from qlora_cli.train.trainer import CheckpointingMixin

# The figures TRL logs for each method, in the order the end panel shows them.
FIGURES = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
           "logps/rejected")


class _PreTokenized:
    """TRL's preference trainers tokenize text columns with the tokenizer's chat template. Our rows
    arrive as token ids already (data/preference.py), rendered by the run's template: keep them."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


class QloraDPOTrainer(CheckpointingMixin, _PreTokenized, DPOTrainer):
    """DPOTrainer with atomic checkpoints, the non-finite stop and exact resume (CheckpointingMixin)."""


class QloraKTOTrainer(CheckpointingMixin, _PreTokenized, KTOTrainer):
    """KTOTrainer likewise. KTO's KL term pairs each prompt with another row's completion, within a
    batch; TRL builds those mismatched completions when it tokenizes, so they are built here."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.calculate_KL and "KL_completion_ids" not in dataset.column_names:
            # As TRL's own preparation: rotate the completions by one within each batch, so the KL
            # estimate uses the batch's own replies with other prompts (rows are in training order:
            # train_sampling_strategy sequential, and our pipeline shuffled them with the seed).
            def rotate(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            dataset = dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)
        return dataset


def _orpo_trainer_class():
    """ORPO lives in trl.experimental in TRL 1.x (the old tokenizing trainer, with its own collator)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that experimental APIs may change
        from trl.experimental.orpo import ORPOTrainer

    class QloraORPOTrainer(CheckpointingMixin, ORPOTrainer):
        """ORPOTrainer with the mixin's guarantees; its rows arrive in its own tokenized layout
        (orpo_rows), which its tokenize_row would redo from text, so it keeps them as they are."""

        def tokenize_row(self, feature, model=None):
            return feature if "chosen_input_ids" in feature else super().tokenize_row(feature, model)

        def _trl_train_metrics(self) -> dict:
            return self._stored_metrics["train"]  # the old trainers' name for TRL's _metrics

    return QloraORPOTrainer


def orpo_rows(dataset, label_pad: int = -100):
    """Our (prompt_ids, chosen_ids, rejected_ids) rows in ORPOTrainer's tokenized layout: prompt and
    each full sequence with their masks, and labels that score only the reply."""

    def convert(row):
        prompt, chosen, rejected = row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            ids = prompt + reply
            out[f"{name}_input_ids"] = ids
            out[f"{name}_attention_mask"] = [1] * len(ids)
            out[f"{name}_labels"] = [label_pad] * len(prompt) + reply
        return out

    return dataset.map(convert, remove_columns=dataset.column_names)


def build_preference_config(recipe, run, has_eval: bool, resuming: bool = False):
    """Recipe -> DPOConfig, KTOConfig or ORPOConfig: the shared TrainingArguments plus the method's own."""
    from qlora_cli.train.run import trainer_arguments

    p, method = recipe.preference, recipe.train.method
    args = trainer_arguments(recipe, run, has_eval, resuming)
    args.update(max_length=recipe.data.max_seq_len, beta=p.beta)
    if method == "dpo":
        from trl import DPOConfig

        loss_type, weights = [p.loss_type], None
        if p.rpo_alpha is not None:  # RPO: DPO plus the chosen reply's NLL (TRL's "sft" loss), weighted
            loss_type, weights = [p.loss_type, "sft"], [1.0, p.rpo_alpha]
        return DPOConfig(**args, loss_type=loss_type, loss_weights=weights, label_smoothing=p.label_smoothing)
    if method == "kto":
        from trl import KTOConfig

        # Our rows are shuffled with the seed already; KTO's KL pairs need them in that order.
        return KTOConfig(**args, desirable_weight=p.desirable_weight, undesirable_weight=p.undesirable_weight,
                         train_sampling_strategy="sequential")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig
    return ORPOConfig(**args)


def build_preference_trainer(recipe, run, console=None, resuming: bool = False, callbacks=(), display: str = "rich",
                             phase=lambda text: None):
    """Tokenizer, preference data, 4-bit model, LoRA (fresh or model.adapter's) and TRL's trainer.
    phase(text) names each loading step as it starts, as build_trainer's does (train/run.py)."""
    from transformers import PrinterCallback, set_seed

    from qlora_cli.data.preference import build_preference_datasets
    from qlora_cli.model.adapter import attach_adapter, keep_exact_adapter
    from qlora_cli.model.architectures import check_vocab_fits
    from qlora_cli.model.load import keep_adapter_fp32, load_base_model
    from qlora_cli.model.tokenizer import prepare_tokenizer
    from qlora_cli.train import distributed
    from qlora_cli.train.metrics_log import MetricsLog
    from qlora_cli.train.progress import JsonLines, RichProgress
    from qlora_cli.train.run import Setup, parameter_counts

    set_seed(recipe.train.seed)
    group = distributed.init_process_group(cuda=torch.cuda.is_available())
    phase("loading the tokenizer")
    tokenizer, template = prepare_tokenizer(recipe)
    if tokenizer.pad_token is None:  # TRL's collators pad with it; the padded positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    method = recipe.train.method
    phase("tokenizing the preference data")
    with distributed.main_process_first(group):
        prepared = build_preference_datasets(recipe.data, tokenizer, template, seed=recipe.train.seed,
                                             method=method, batch_size=recipe.train.batch_size)
    train_ds, eval_ds = prepared.for_trainer()
    if method == "orpo":
        train_ds = orpo_rows(train_ds)
        eval_ds = orpo_rows(eval_ds) if eval_ds is not None else None
    distributed.prepare_loading(recipe)
    phase(f"loading {recipe.model.name_or_path} in 4 bits")
    model = load_base_model(recipe.model, recipe.quant, place=not recipe.distributed.sharded)
    check_vocab_fits(tokenizer, model.get_input_embeddings().num_embeddings)
    model.config.use_cache = False
    model = attach_adapter(model, recipe, phase)
    trainer_class = {"dpo": QloraDPOTrainer, "kto": QloraKTOTrainer}.get(method) or _orpo_trainer_class()
    restore_adapter = keep_exact_adapter(model)
    trainer = trainer_class(
        model=model,
        args=build_preference_config(recipe, run, has_eval=eval_ds is not None, resuming=resuming),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[MetricsLog(run), *{"rich": [RichProgress(console)], "json": [JsonLines()], "quiet": []}[display],
                   *callbacks],
        keep_checkpoints=recipe.train.save_total_limit,
    )
    trainer.remove_callback(PrinterCallback)
    # TRL casts trainable weights to bf16 for 4-bit models, as SFTTrainer does: back to the exact fp32
    # weights (a continued adapter must start as it ended, equal to the reference TRL copied from it).
    restore_adapter(trainer.model)
    keep_adapter_fp32(trainer.model)

    def save_adapter(path):
        # Only the trained adapter: TRL's frozen "ref" copy is the starting point, not the result.
        trainer.model.save_pretrained(path, selected_adapters=["default"])

    return Setup(trainer=trainer, tokenizer=tokenizer, template=template, data=prepared, model=model,
                 parameters=parameter_counts(model), process_group=group, save_adapter=save_adapter)


def preference_summary(recipe, run, final_eval: dict) -> dict:
    """summary.json's `preference`: the method, its settings and its figures at the first and last
    logged training step and on the validation pairs before (step 0) and after training."""
    metrics = run.read_metrics()
    train_logs = [m for m in metrics if "loss" in m and any(f in m for f in FIGURES)]
    evals = [m for m in metrics if "eval_loss" in m]

    def pick(record: dict | None, prefix: str = "") -> dict | None:
        if not record:
            return None
        out = {f: record[prefix + f] for f in FIGURES if prefix + f in record}
        return out or None

    before = next((m for m in evals if m.get("step") == 0), None)
    return {
        "method": recipe.train.method,
        "beta": recipe.preference.beta,
        **({"loss_type": recipe.preference.loss_type} if recipe.train.method == "dpo" else {}),
        "reference": "the starting adapter, frozen (the base model itself for a fresh adapter)"
        if recipe.train.method != "orpo" else "none (ORPO needs no reference)",
        "started_from": recipe.model.adapter,
        "train_first": pick(train_logs[0] if train_logs else None),
        "train_last": pick(train_logs[-1] if train_logs else None),
        "eval_before": pick(before, "eval_"),
        "eval_after": pick(final_eval, "eval_"),
    }
