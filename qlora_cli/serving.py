"""What other tools read from a run directory or a merged model, written so they agree with qlora.

    stop_token_ids(generation_config, tokenizer)   # every token a turn may end on
    write_generation_config(folder, base, tokenizer)
    make_base_path_absolute(folder)                # adapter_config.json usable from any directory

Plain `transformers` `generate()`, and servers that read `generation_config.json`, stop on its
`eos_token_id` only. A base model's file names the base's EOS (`</s>`), while a run trained with
ChatML ends its turns with `<|im_end|>`: without that token in the file, plain `generate()` runs
on past the end of the reply (`cold<|im_end|><|im_end|>...`). `qlora generate` stops on the same
set (targets.Target.stop_ids), so both agree.
"""

from __future__ import annotations

import json
from pathlib import Path


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """The base's own end-of-sequence ids, plus the tokenizer's EOS, which apply_template has set
    to the run's stop token (the template's end of turn)."""
    ids = generation_config.eos_token_id if generation_config is not None else None
    ids = list(ids) if isinstance(ids, (list, tuple)) else ([] if ids is None else [ids])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def write_generation_config(folder: Path, base, model_config, tokenizer) -> None:
    """generation_config.json for FOLDER: the base's (a directory path or a GenerationConfig), or
    one derived from the model config when the base has none, with the run's stop tokens."""
    from transformers import GenerationConfig

    if isinstance(base, GenerationConfig):
        generation = GenerationConfig.from_dict(base.to_dict())
    else:
        try:
            generation = GenerationConfig.from_pretrained(base)
        except OSError:  # the base has none: derive it from the model config, as from_pretrained would
            generation = GenerationConfig.from_model_config(model_config)
    ids = stop_token_ids(generation, tokenizer)
    generation.eos_token_id = ids[0] if len(ids) == 1 else ids  # a list only where there are several
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id  # else generate() warns and pads with EOS anyway
    generation.save_pretrained(folder)


def make_base_path_absolute(folder: Path) -> None:
    """PEFT records the base as it was given to from_pretrained: a relative path when the recipe
    had one, which `AutoPeftModelForCausalLM.from_pretrained(RUN)` from another directory then
    takes for a hub id. Local bases are written absolute; hub ids stay as they are."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base or Path(base).is_absolute() or not Path(base).expanduser().is_dir():
        return
    config["base_model_name_or_path"] = str(Path(base).expanduser().resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
