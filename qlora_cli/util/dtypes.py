"""Data types by name: the recipe's names (`bfloat16`), the short ones `qlora merge --dtype` and the
reports use (`bf16`), torch's objects, and safetensors' header names. One table for all of them.

    torch_dtype("bfloat16") is torch_dtype("bf16") is torch.bfloat16
    short_name(torch.bfloat16) == short_name("bfloat16") == "bf16"
"""

from __future__ import annotations

import torch

# The recipe's names (model.dtype, quant.compute_dtype, quant.storage_dtype) -> torch.
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}
# The floating types by their short names, in the order `--dtype` lists them.
SHORT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# safetensors' header names (what a checkpoint's tensors are stored as, read without loading them).
SAFETENSORS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}
SAFETENSORS_FLOAT = {"F64", "F32", "F16", "BF16"}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH.get(name) or SHORT[name]


def short_name(dtype: torch.dtype | str) -> str:
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    return next(short for short, d in SHORT.items() if d == dtype)


def bytes_per(name: str) -> int:
    return torch_dtype(name).itemsize
