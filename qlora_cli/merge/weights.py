"""The arithmetic of a merge, one tensor at a time: read the adapter, plan, fold, write shards.

    adapter = read_adapter(run_dir)                           # LoRA/DoRA factors + saved modules
    base = BaseCheckpoint.open(model_dir)                     # safetensors headers only, no weights
    quantized, tied = inspect_model(config, recipe.quant, model_dtype)  # what training held in 4 bits
    plan = plan_merge(adapter, base, tied=tied, quantized=quantized, ...)
    for shard in base.shards:                                 # streams, never the whole model
        for name, tensor in merged_shard(plan, shard, "dequantized"):
            writer.add(name, tensor)
        writer.end_input_shard()

GPT-2-style `Conv1D` layers store their weight transposed, [in, out]. transformers transposes such a
weight before quantizing it (so the 4-bit layer holds [out, in]) and PEFT's factors are always
A [r, in], B [out, r]: the fold works on the transposed weight, exactly as training saw it, and
transposes the result back into the checkpoint's layout (`MergePlan.transposed`).

Two ways to fold an update into a weight (the `--base` flag):
- `dequantized`: the weight is first quantized to 4 bits and back, exactly as training loaded it
  (same dtype, quant type, double quantization, block size, device kind), so the merged model is
  the model the adapter was trained against.
- `original`: the update is added to the checkpoint's original weights, which the adapter never
  saw; the difference is the quantization error of every quantized layer.

Memory: tensors are read one at a time from a memory-mapped safetensors shard (whose pages count
as resident while it is open), output tensors are fresh copies, and an output shard is flushed
as soon as it is complete, so the peak is about one input shard, one output shard and the
adapter (measured by benchmarks/bench_merge.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_cli.errors import Problem, UserError
from qlora_cli.util.dtypes import SAFETENSORS, SAFETENSORS_FLOAT
from qlora_cli.util.memory import trim_heap

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# --- The adapter ---------------------------------------------------------------------------------


@dataclass
class LoraUpdate:
    """One adapted module: its update is `scale * B @ A` (transposed for embeddings)."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: per-output-row magnitude
    embedding: bool = False  # PEFT stores embedding factors the other way round

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    def delta(self) -> torch.Tensor:
        """The update to the weight: a new fp32 tensor shaped like the weight ([out, in] or [vocab, dim])."""
        d = (self.B.float() @ self.A.float()).mul_(self.scale)
        return d.T.contiguous() if self.embedding else d

    def magnitude_shape(self) -> tuple[int]:
        """DoRA keeps one magnitude per output row; for embeddings, per embedding column."""
        return (self.expected_shape()[1 if self.embedding else 0],)

    def expected_shape(self) -> tuple[int, int]:
        if self.embedding:
            return (self.A.shape[1], self.B.shape[0])
        return (self.B.shape[0], self.A.shape[1])


@dataclass
class Adapter:
    updates: dict[str, LoraUpdate]  # weight key -> update
    replacements: dict[str, torch.Tensor]  # weight key -> trained full tensor (modules_to_save)
    config: dict
    kind: str  # "LoRA", "rsLoRA", "DoRA", ...


def read_adapter(run_dir: Path) -> Adapter:
    """Parse a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    cfg_path, weights_path = run_dir / ADAPTER_CONFIG, run_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        raise UserError.single(
            "RUN_DIR",
            f"{run_dir} has no adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}): point at the directory "
            "`qlora train` wrote, after the run finished",
        )
    from safetensors import SafetensorError

    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_path))
    except (OSError, ValueError, SafetensorError) as exc:  # truncated or corrupt files
        raise UserError.single("RUN_DIR", f"cannot read the adapter in {run_dir}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise UserError.single("RUN_DIR", f"{cfg_path} is not a LoRA adapter config (no numeric lora_alpha)")
    if config.get("peft_type") != "LORA":
        raise UserError.single("RUN_DIR", f"{cfg_path} is a {config.get('peft_type')} adapter; only LoRA can be merged")
    # fan_in_fan_out (PEFT sets it for full-precision Conv1D layers) only says how the base weight is
    # stored; the factors are A [r, in], B [out, r] either way. The merge takes the layout from the
    # module's type instead (inspect_model), which also covers Conv1D layers quantized to 4 bits,
    # whose adapters PEFT records without the flag.
    for flag in ("lora_bias", "use_qalora"):
        if config.get(flag):
            raise UserError.single("RUN_DIR", f"{cfg_path} sets {flag}, which qlora merge does not support")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector)", name)
        if m:
            module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            factors.setdefault(module, {})[part] = tensor
        elif name.endswith(".base_layer.bias"):
            # A trained bias (lora.bias: all / lora_only) of an adapted layer: replaces the base's.
            replacements[name.replace(".base_layer.bias", ".bias")] = tensor
        elif ".base_layer." in name:
            continue  # PEFT saves the (unchanged) base embedding beside embedding adapters
        else:
            replacements[name] = tensor  # a modules_to_save copy or a trained bias: replaces the base

    updates = {}
    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts
        A = parts.get("lora_embedding_A" if embedding else "lora_A")
        B = parts.get("lora_embedding_B" if embedding else "lora_B")
        if A is None or B is None:
            raise UserError.single("RUN_DIR", f"{weights_path}: {module} has only half of its LoRA factors")
        r = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        updates[f"{module}.weight"] = LoraUpdate(
            module, A, B, scale, magnitude=parts.get("lora_magnitude_vector"), embedding=embedding
        )
    if not updates and not replacements:
        raise UserError.single("RUN_DIR", f"{weights_path} holds no LoRA weights")
    kind = "DoRA" if config.get("use_dora") else ("rsLoRA" if config.get("use_rslora") else "LoRA")
    return Adapter(updates, replacements, config, kind)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module overrides (alpha_pattern), matched the way PEFT matches them."""
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), module)
    return patterns.get(key, default)


# --- The base checkpoint --------------------------------------------------------------------------


@dataclass
class BaseCheckpoint:
    """A safetensors checkpoint, read through its headers: names, shapes and dtypes, no data."""

    folder: Path
    shards: list[str]  # file names, in order
    keys: dict[str, list[str]]  # shard -> tensor names, in file order
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # safetensors dtype names: F32, BF16, ...

    @classmethod
    def open(cls, folder: Path) -> "BaseCheckpoint":
        from safetensors import safe_open

        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise UserError.single("model.name_or_path", f"{folder / INDEX} is not a valid index: {exc}") from None
        elif (folder / SINGLE).is_file():
            shards = [SINGLE]
        else:
            raise UserError.single(
                "model.name_or_path",
                f"{folder} has no safetensors weights ({SINGLE} or {INDEX}); qlora merge streams safetensors "
                "only: load the model and save_pretrained() it once to convert",
            )
        keys, shapes, dtypes = {}, {}, {}
        for shard in shards:
            try:
                with safe_open(str(folder / shard), "pt") as f:
                    keys[shard] = list(f.keys())
                    for k in keys[shard]:
                        sl = f.get_slice(k)
                        shapes[k], dtypes[k] = tuple(sl.get_shape()), sl.get_dtype()
            except (OSError, Exception) as exc:  # safetensors raises its own error types
                raise UserError.single("model.name_or_path", f"cannot read {folder / shard}: {exc}") from None
        return cls(folder, shards, keys, shapes, dtypes)

    def total_bytes(self) -> int:
        return sum((self.folder / s).stat().st_size for s in self.shards)


class QuantizedWeights(set):
    """The weight keys training held in 4 bits. `transposed` names the weights the checkpoint stores
    as [in, out] (GPT-2-style Conv1D layers, in 4 bits or not); the adapter's update to them is
    [out, in], and transformers quantizes them transposed."""

    def __init__(self, keys=(), transposed=()):
        super().__init__(keys)
        self.transposed = frozenset(transposed)


def inspect_model(config, quant, model_dtype: torch.dtype) -> tuple[QuantizedWeights, dict[str, str]]:
    """(the weights training held in 4 bits, the tied weights {copy: source}), by name.

    Both asked of transformers itself, on an empty meta-device model: its bitsandbytes quantizer
    decides what is quantized (every linear layer but the output head and the modules the config
    keeps in full precision), and its tying rules say which weights share storage (e.g.
    lm_head.weight -> model.embed_tokens.weight when tie_word_embeddings is set). The quantizer
    also records which 4-bit layers were Conv1D (`source_cls`), whose weights are stored transposed.
    """
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    from qlora_cli.model.meta import quantized_meta_model

    model = quantized_meta_model(config, quant, model_dtype)
    quantized, transposed = set(), set()
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            quantized.add(f"{name}.weight")
        if isinstance(m, Conv1D) or issubclass(getattr(m, "source_cls", type(None)), Conv1D):
            transposed.add(f"{name}.weight")
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    return QuantizedWeights(quantized, transposed), tied


# --- The plan -------------------------------------------------------------------------------------


@dataclass
class MergePlan:
    base: BaseCheckpoint
    adapter: Adapter
    quantized: set[str]  # weight keys training held in 4 bits
    untie: dict[str, str]  # tied copy -> source, written out separately because the adapter changed one side
    quant: object  # the recipe's quant section
    model_dtype: torch.dtype  # what training loaded the checkpoint as
    out_dtype: torch.dtype
    device: str  # where to quantize: the device kind training used
    counts: dict = field(default_factory=dict)
    transposed: frozenset = frozenset()  # weight keys stored [in, out] (Conv1D): folded transposed

    def output_bytes(self) -> int:
        size = torch.tensor([], dtype=self.out_dtype).element_size()
        total = 0
        for key, shape in [*self.base.shapes.items(), *((t, self.base.shapes[s]) for t, s in self.untie.items())]:
            dtype = self.base.dtypes[self.untie.get(key, key)]
            total += math.prod(shape) * (size if dtype in SAFETENSORS_FLOAT else SAFETENSORS[dtype].itemsize)
        return total




def plan_merge(adapter: Adapter, base: BaseCheckpoint, tied: dict[str, str], transposed=None, **kw) -> MergePlan:
    """Check every adapter tensor against the base's shapes before anything is written.

    A tied pair (lm_head sharing the input embeddings) is stored once in the checkpoint. When
    the adapter changes one side only, the PEFT model no longer shares them, so the merge writes
    both and unties them in config.json. TRANSPOSED (default: what inspect_model found, carried
    by `quantized`) names the weights stored [in, out], whose updates are checked transposed.
    """
    if transposed is None:
        transposed = getattr(kw.get("quantized"), "transposed", frozenset())
    transposed = frozenset(transposed)
    touched = adapter.updates.keys() | adapter.replacements.keys()
    untie = {
        copy: source for copy, source in tied.items()
        if copy not in base.shapes and source in base.shapes and {copy, source} & touched
    }
    shapes = {**base.shapes, **{copy: base.shapes[source] for copy, source in untie.items()}}
    problems = []
    for key, u in adapter.updates.items():
        stored = shapes.get(key)
        if stored is not None and key in transposed:
            stored = stored[::-1]  # a Conv1D weight: the adapter sees it as [out, in]
        if key not in shapes:
            problems.append(Problem(u.module, f"adapted by the run but the base checkpoint has no {key}"))
        elif stored != u.expected_shape():
            layout = " (stored transposed, as a Conv1D weight)" if key in transposed else ""
            problems.append(Problem(
                u.module, f"the adapter was trained for shape {list(u.expected_shape())}, the base has {list(stored)}{layout}",
            ))
        elif u.magnitude is not None and tuple(u.magnitude.shape) != u.magnitude_shape():
            problems.append(Problem(u.module, f"DoRA magnitude has shape {list(u.magnitude.shape)}, expected {list(u.magnitude_shape())}"))
    for key, t in adapter.replacements.items():
        if key not in shapes:
            problems.append(Problem(key, "saved with the adapter but absent from the base checkpoint"))
        elif shapes[key] != tuple(t.shape):
            problems.append(Problem(key, f"saved with shape {list(t.shape)}, the base has {list(shapes[key])}"))
    if problems:
        raise UserError(
            problems[:10] + ([Problem("...", f"and {len(problems) - 10} more")] if len(problems) > 10 else []),
            header=f"the adapter does not fit the base model in {base.folder}: was it trained on another model?",
        )
    return MergePlan(base=base, adapter=adapter, untie=untie, transposed=transposed, **kw)


# --- The fold -------------------------------------------------------------------------------------


def nf4_roundtrip(weight: torch.Tensor, quant, model_dtype: torch.dtype, device: str) -> torch.Tensor:
    """The weight as a 4-bit layer sees it: cast, quantized by bitsandbytes exactly as
    transformers does at load time (a Params4bit moved to the device), and dequantized."""
    import bitsandbytes as bnb

    from qlora_cli.model.load import storage_dtype

    param = bnb.nn.Params4bit(
        weight.to(model_dtype), requires_grad=False, quant_type=quant.quant_type,
        compress_statistics=quant.double_quant, quant_storage=storage_dtype(quant),
    ).to(device)
    return bnb.functional.dequantize_4bit(param.data, param.quant_state).cpu()


def fold(plan: MergePlan, key: str, tensor: torch.Tensor, base_mode: str) -> torch.Tensor:
    """One output tensor from one checkpoint tensor. Never returns a view of the input file."""
    a = plan.adapter
    if key in a.replacements:
        return a.replacements[key].to(plan.out_dtype)
    if not tensor.is_floating_point():
        return tensor.clone()
    if key in plan.transposed:
        # A Conv1D weight, stored [in, out]: fold it as [out, in], the layout transformers quantizes
        # (it transposes before quantizing, so the NF4 blocks run along the other axis) and the
        # adapter's update has, then store the result the checkpoint's way round again.
        return _fold(plan, key, tensor.T, base_mode).T.contiguous()
    return _fold(plan, key, tensor, base_mode)


def _fold(plan: MergePlan, key: str, tensor: torch.Tensor, base_mode: str) -> torch.Tensor:
    a = plan.adapter
    if base_mode == "dequantized":
        # Training saw every quantized weight through NF4, and every other one cast to the model dtype.
        if key in plan.quantized:
            tensor = nf4_roundtrip(tensor, plan.quant, plan.model_dtype, plan.device)
        else:
            tensor = tensor.to(plan.model_dtype)
    update = a.updates.get(key)
    if update is None:
        # copy=True: an unchanged tensor would otherwise stay a view of the memory-mapped input
        # shard, and an output shard holding it would keep the whole input file resident.
        return tensor.to(plan.out_dtype, copy=True)
    w = update.delta()  # a fresh fp32 tensor: add into it in place, one full-size temporary only
    w.add_(tensor)
    if update.magnitude is not None:
        # DoRA: rescale each output row (embedding column, for embeddings) to its learned
        # magnitude: PEFT's merge, with the norm taken of the merged weight, as in its forward.
        dim, shape = (0, (1, -1)) if update.embedding else (1, (-1, 1))
        w.mul_((update.magnitude.float() / torch.linalg.norm(w, dim=dim)).view(*shape))
    return w.to(plan.out_dtype)


def merged_shard(plan: MergePlan, shard: str, base_mode: str):
    """Yield (name, merged tensor) for one input shard, one tensor resident at a time."""
    from safetensors import safe_open

    copies = {source: copy for copy, source in plan.untie.items()}
    with safe_open(str(plan.base.folder / shard), "pt") as f:
        for key in plan.base.keys[shard]:
            tensor = f.get_tensor(key)
            yield key, fold(plan, key, tensor, base_mode)
            if key in copies:  # an untied copy starts from the same checkpoint tensor
                yield copies[key], fold(plan, copies[key], tensor, base_mode)
            del tensor
            trim_heap()  # a tensor of a few MB each: about 200 MB off a 1 GB model's peak


def merged_tensors(plan: MergePlan, base_mode: str):
    """Yield (name, merged tensor) for the whole checkpoint."""
    for shard in plan.base.shards:
        yield from merged_shard(plan, shard, base_mode)


# --- The writer -----------------------------------------------------------------------------------


def output_shards(plan: MergePlan, max_shard_bytes: int | None) -> dict[str, list[str]]:
    """{file name: the weight keys it holds}, in the order merged_shard yields them. Without a size
    limit the output mirrors the input's shards (so merging holds one input shard's worth at a time);
    with one, huggingface_hub splits the output the way `save_pretrained(max_shard_size=...)` does,
    planned on meta tensors of the output's shapes and dtypes (nothing is read)."""
    copies = {source: copy for copy, source in plan.untie.items()}
    groups = [[k for key in plan.base.keys[shard] for k in ([key, copies[key]] if key in copies else [key])]
              for shard in plan.base.shards]
    groups = [group for group in groups if group]
    keys = [k for group in groups for k in group]
    if max_shard_bytes is None:
        n = len(groups)
        return {SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors": group
                for i, group in enumerate(groups, start=1)}
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {}
    for key in keys:
        source = plan.untie.get(key, key)
        dtype = plan.out_dtype if plan.base.dtypes[source] in SAFETENSORS_FLOAT else SAFETENSORS[plan.base.dtypes[source]]
        meta[key] = torch.empty(plan.base.shapes[source], dtype=dtype, device="meta")
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_bytes)
    return {name: [k for k in keys if k in set(names)] for name, names in split.filename_to_tensors.items()}


def save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, with the permissions of every other file here and I/O errors as OSError."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as exc:  # SafetensorError wraps I/O errors: "... (os error 28)"
        m = re.search(r"os error (\d+)", str(exc))
        if m is None:
            raise
        raise OSError(int(m.group(1)), os.strerror(int(m.group(1)))) from exc
    # safetensors creates the file private (0600); give it the permissions of every other
    # file here, so a model merged by one account can be served by another.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_index(folder: Path, files: dict[str, list[str]], sizes: dict[str, int]) -> None:
    """model.safetensors.index.json, as transformers writes it, when there is more than one file."""
    if len(files) == 1:
        return
    weight_map = {key: name for name, keys in files.items() for key in keys}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def parse_size(text: str, flag: str = "--max-shard-size", bare: str = "B") -> int:
    """'500MB', '2GB', '1.5GiB' -> bytes (decimal units, as transformers uses). A bare number is in
    the unit `bare`: bytes for --max-shard-size (as transformers reads an int), GB for --gpu-memory
    (nobody means 24 bytes of GPU memory)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) in ("I", "IB") or (m.group(2) and not m.group(2).endswith("B")):
        raise UserError.single(flag, f"{text!r} is not a size: write e.g. 500MB, 2GB or 1.5GiB")
    unit = (m.group(2) or bare.upper()).removesuffix("B")
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".find(unit[:1]) + 1 if unit else 0
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise UserError.single(flag, f"{text!r} is not a positive size")
    return size
