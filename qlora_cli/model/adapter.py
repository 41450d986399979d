"""model.adapter: continue an earlier run's LoRA adapter instead of starting a fresh one.

    recipe = with_adapter_template(recipe)        # the SFT run's template, when data.template is unset
    check_adapter(recipe)                          # its LoRA shape must be the recipe's (no model loaded)
    model = attach_adapter(model, recipe)          # fresh LoRA, or the adapter's weights, trainable

Preference tuning starts from the SFT run (the policy is the SFT model, and so is DPO's reference);
SFT may continue from an earlier adapter the same way. The adapter is loaded onto the same 4-bit base
with the same preparation as a fresh one (model/load.py's attach_lora): so its weights train in fp32,
and the frozen layers keep the dtypes they have in any other run.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_cli.errors import UserError


def adapter_path(path: str) -> Path:
    """The directory holding adapter_config.json: a qlora run directory or a PEFT adapter directory."""
    root = Path(path).expanduser()
    if not (root / "adapter_config.json").is_file():
        hint = (" (the run has no final adapter yet: it did not finish; train it to the end, or point at one of its "
                "checkpoints/checkpoint-N)") if (root / "recipe.yaml").is_file() else ""
        raise UserError.single("model.adapter", f"{root} holds no adapter_config.json: give a finished qlora run "
                               f"directory or a PEFT adapter directory{hint}")
    return root


def adapter_config(path: str) -> dict:
    return json.loads((adapter_path(path) / "adapter_config.json").read_text(encoding="utf-8"))


def run_template(path: str) -> str | None:
    """The template the run at PATH trained with (its recipe.yaml), or None when PATH is no qlora run."""
    import yaml

    from qlora_cli.recipe.schema import Recipe, default_template

    recipe_file = Path(path).expanduser() / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    try:
        return default_template(Recipe.model_validate(yaml.safe_load(recipe_file.read_text(encoding="utf-8"))))
    except Exception:  # an older or damaged recipe: the user can still set data.template
        return None


def with_adapter_template(recipe):
    """A recipe whose data.template is the adapter run's, when it continues one and sets none: the
    adapter learned its replies in that template, so prompts must keep being rendered with it."""
    if recipe.model.adapter is None or recipe.data.template is not None:
        return recipe
    template = run_template(recipe.model.adapter)
    if template is None:
        return recipe
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"template": template})})


def check_adapter(recipe) -> None:
    """The adapter must have the recipe's LoRA shape: recipe.yaml records what was trained, and resume
    and merge rebuild the adapter from it. Refused before any model loads, naming the keys."""
    if recipe.model.adapter is None:
        return
    config = adapter_config(recipe.model.adapter)
    lora = recipe.lora
    targets = config.get("target_modules")
    theirs = {
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "modules_to_save": sorted(config.get("modules_to_save") or []),
    }
    ours = {"r": lora.r, "alpha": lora.alpha, "use_dora": lora.use_dora, "use_rslora": lora.use_rslora,
            "modules_to_save": sorted(lora.modules_to_save)}
    problems = [f"lora.{key} is {ours[key]!r} but the adapter has {theirs[key]!r}" for key in ours
                if theirs[key] is not None and theirs[key] != ours[key]]
    if isinstance(lora.target_modules, list) and isinstance(targets, list) and sorted(lora.target_modules) != sorted(targets):
        problems.append(f"lora.target_modules is {sorted(lora.target_modules)} but the adapter has {sorted(targets)}")
    if problems:
        raise UserError.single("model.adapter", (
            f"{recipe.model.adapter}'s LoRA shape differs from the recipe's: {'; '.join(problems)}. Set the lora "
            "section to the adapter's (its run's recipe.yaml has it)"))


def attach_adapter(model, recipe, phase=lambda text: None):
    """Fresh LoRA adapters (attach_lora), or model.adapter's weights made trainable, on a prepared base.
    phase(text) is told which of the two it is doing (the loading spinner of `qlora train`)."""
    from qlora_cli.model.load import attach_lora

    phase("attaching LoRA adapters" if recipe.model.adapter is None else f"loading the adapter of {recipe.model.adapter}")
    if recipe.model.adapter is None:
        return attach_lora(model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing,
                           upcast=not recipe.distributed.sharded)  # sharded: one dtype per FSDP unit
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training

    from qlora_cli.model.load import compute_dtype, frozen_weights_stay_narrow, restore_frozen_dtypes

    check_adapter(recipe)
    loaded = {id(p): p.dtype for p in model.parameters()}
    sharded = recipe.distributed.sharded
    if not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    peft_model = PeftModel.from_pretrained(model, str(adapter_path(recipe.model.adapter)), is_trainable=True)
    if not sharded and frozen_weights_stay_narrow(compute_dtype(model), torch.cuda.is_available()):
        restore_frozen_dtypes(peft_model, loaded)
    for name, param in peft_model.named_parameters():  # PEFT loads adapters in fp32 already; keep it so
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return peft_model


def keep_exact_adapter(model):
    """Returns a function that puts the trainable weights back exactly as they are now, in fp32.

    TRL's trainers cast the trainable weights of a 4-bit model to bf16 when they are built, and
    keep_adapter_fp32 (model/load.py) only upcasts them again: the bf16 rounding stays. For a fresh
    adapter that only rounds a random initialisation; for one continued from an earlier run
    (model.adapter) it would change the trained weights before the first step, and DPO's policy would
    no longer start equal to its reference (TRL copies the reference adapter before that cast)."""
    saved = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}

    def restore(trained_model) -> None:
        for name, p in trained_model.named_parameters():
            if name in saved:
                p.data = saved[name].to(p.device)

    return restore
