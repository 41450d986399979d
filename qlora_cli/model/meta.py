"""The model as training would hold it, built on the meta device: no weights read, no memory used.

`qlora estimate`, `qlora validate` (4-bit coverage) and `qlora merge` (which weights were in 4 bits)
all ask transformers' own bitsandbytes quantizer rather than guessing from layer names.
"""

from __future__ import annotations

import torch


def quantized_meta_model(config, quant, model_dtype: torch.dtype):
    """The model on the meta device, its layers swapped for 4-bit ones exactly as a training load
    would (no memory used; parameters keep their full shapes)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    from qlora_cli.model.architectures import plain_linears
    from qlora_cli.model.load import build_bnb_config

    with init_empty_weights(), plain_linears(config.model_type):
        model = AutoModelForCausalLM.from_config(config)
    quantizer = AutoHfQuantizer.from_config(build_bnb_config(quant), pre_quantized=False)
    quantizer.preprocess_model(model, dtype=model_dtype, device_map={"": "cpu"})
    return model
