"""The recipe: its schema, and how a YAML file plus `--set` overrides become one validated object.

    recipe = load_recipe("configs/tiny.yaml", overrides=["lora.r=8", "train.max_steps=20"])
    recipe.lora.r            # 8, typed
    recipe.to_yaml()         # the fully resolved recipe, defaults included

Precedence is explicit: schema default < YAML < `--set`, and validation happens once, on the
merged result. Every problem is collected and reported at once, each with its dotted key, the
YAML line it sits on, and what to do (`UserError`, exit 2). Unknown keys are rejected with a
near-match suggestion, because a silently ignored typo (`lora.alpah: 64`) is the single most
common way a fine-tuning run quietly does the wrong thing.

The schema is the documentation: every field has a type, a default and a description, and the
JSON Schema (`qlora schema`) is generated from these classes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from qlora_cli.errors import Problem, UserError

DType = Literal["bfloat16", "float16", "float32"]


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, and defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value, info):
        # pydantic's lax mode takes true as 1 and false as 0 for int and float fields: `lora.r: true`
        # trained at rank 1. A boolean is never meant as a number. Only booleans are refused: strings
        # still convert, because YAML 1.1 reads `2e-4` (no dot) as text and `--set
        # train.learning_rate=2e-4` must keep working.
        if isinstance(value, bool):
            kind = _number_kind(cls.model_fields[info.field_name].annotation)
            if kind is not None:
                raise ValueError(f"must be {kind}, not the boolean {str(value).lower()} "
                                 "(YAML reads true, false, yes, no, on and off as booleans)")
        return value


def _number_kind(annotation) -> str | None:
    """'a whole number' for an int field, 'a number' for a float one (also as `X | None`), else None."""
    types = get_args(annotation) or (annotation,)
    if float in types:
        return "a number"
    return "a whole number" if int in types else None


class ModelSection(Section):
    """The base model to fine-tune."""

    name_or_path: str = Field(
        description="Hugging Face hub id (e.g. mistralai/Mistral-7B-v0.1) or a local directory holding config.json."
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit to load. Ignored for local paths.")
    dtype: DType = Field(
        "bfloat16",
        description="dtype of the layers that are not quantized (embeddings, norms, lm_head).",
    )
    trust_remote_code: bool = Field(
        False, description="Declare that the model needs the Python code shipped inside its repository. The code "
        "runs only when the command line also says --trust-remote-code; only give it for code you trust.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel. null lets transformers pick (sdpa where available)."
    )


class QuantSection(Section):
    """How the frozen base weights are quantized by bitsandbytes."""

    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type. nf4 (NormalFloat) is the QLoRA paper's choice and the better one."
    )
    double_quant: bool = Field(
        True, description="Also quantize the quantization constants (saves about 0.4 bits per parameter)."
    )
    compute_dtype: DType = Field(
        "bfloat16",
        description="dtype the 4-bit weights are dequantized to for matmuls. Also sets mixed precision for training.",
    )
    storage_dtype: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Container dtype for packed 4-bit weights (the 4-bit values are the same in any). auto: uint8, "
        "or model.dtype under distributed.strategy fsdp or deepspeed, which shard only float tensors of one dtype.",
    )


class LoraSection(Section):
    """The low-rank adapters trained on top of the frozen base."""

    r: int = Field(16, ge=1, le=4096, description="Rank of the update matrices. Higher = more capacity and memory.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: 'all-linear' (every linear layer but the output head, as in the "
        "QLoRA paper) or a list of module names such as [q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens]).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA). Slower, sometimes better.")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha / sqrt(r) instead of alpha / r.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return v


DataFormat = Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text"]
# The roles a conversation may hold once converted (data/formats.py); `roles:` maps other names onto them.
CanonicalRole = Literal["system", "user", "assistant", "tool"]


class DataSource(Section):
    """One dataset: local file(s) or a hub dataset id."""

    path: str = Field(
        description="A local .json/.jsonl/.csv/.parquet/.txt file, a glob (data/*.jsonl), a directory (every "
        "file of those types inside it, recursively), or a hub dataset id."
    )
    format: DataFormat = Field(
        description="Row layout. alpaca: instruction/input/output. sharegpt: conversations of {from, value}. "
        "messages: a list of {role, content}. prompt_completion: prompt/completion strings. "
        "text: plain text, trained in full."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map this format's field names to the columns in your file, e.g. {instruction: question}.",
    )
    roles: dict[str, CanonicalRole] = Field(
        default_factory=dict,
        description="sharegpt/messages: map role names in the data to system, user, assistant or tool, e.g. "
        "{function_call: assistant, observation: tool}. human/gpt/system are known already.",
    )
    weight: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Scale this source's share of the training rows: 0.5 uses a seeded half of its rows, 2 uses "
        "every row twice. null = each row once.",
    )
    samples: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Use exactly this many training rows from this source (seeded sample; repeats rows when it "
        "has fewer). Instead of weight.",
    )
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "line", description=".txt files: one example per line, per blank-line-separated paragraph, or per file."
    )
    split: str = Field("train", description="Split to read (hub datasets; local files have only 'train').")
    subset: str | None = Field(None, description="Hub dataset configuration name.")
    revision: str | None = Field(None, description="Hub dataset branch, tag or commit.")


class DataSection(Section):
    """What the model is trained on, and how rows become tokens."""

    sources: list[DataSource] = Field(min_length=1, description="Datasets to train on, mixed and shuffled together.")
    val_sources: list[DataSource] = Field(
        default_factory=list,
        description="Datasets to validate on, instead of holding out val_size rows of the training sources.",
    )
    template: str | None = Field(
        None,
        description="Prompt template: alpaca, chatml, llama3, raw, 'tokenizer' (the tokenizer's own chat "
        "template) or a path to a .jinja file. null picks per format: alpaca -> alpaca, sharegpt and "
        "messages -> chatml, prompt_completion -> raw. Not used by the text format.",
    )
    max_seq_len: int = Field(2048, ge=8, le=2**20, description="Longest sequence in tokens. See on_too_long.")
    on_too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate",
        description="Examples longer than max_seq_len: truncate them (keep the start), drop them, or stop with "
        "an error naming them. Truncated examples left with no response token are dropped either way. "
        "Counts go to the run summary.",
    )
    on_bad_row: Literal["skip", "error"] = Field(
        "skip",
        description="Rows that do not fit their format (malformed JSON, missing or non-string field): skip them "
        "(counted, first few shown) or stop with an error listing them.",
    )
    train_on_inputs: bool = Field(
        False, description="Also compute the loss on prompt/user tokens. Default: only responses (and their EOS)."
    )
    val_size: float = Field(
        0.0,
        ge=0,
        description="Held-out validation rows: a fraction (0 < x < 1) or a whole count (x >= 1). 0 = none.",
    )
    packing: bool = Field(
        False,
        description="Pack several examples into each max_seq_len row (TRL best-fit decreasing, padding-free, "
        "with per-example position ids so examples do not attend to each other). Fewer, fuller steps.",
    )
    cache: bool = Field(
        True,
        description="Reuse the tokenized dataset of an earlier run when the data files, template, tokenizer and "
        "every data setting are unchanged. Stored under $QLORA_CACHE_DIR (default ~/.cache/qlora).",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes for tokenization. null = one per CPU core, at most 8."
    )

    @field_validator("val_size")
    @classmethod
    def _fraction_or_count(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError("must be a fraction below 1 (e.g. 0.05) or a whole number of rows (e.g. 200)")
        return v


Optimizer = Literal[
    "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


class TrainSection(Section):
    """The optimisation loop (run by TRL's SFTTrainer)."""

    epochs: float = Field(3.0, gt=0, description="Passes over the training data. Ignored when max_steps is set.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, le=1000, description="Peak learning rate for the adapter weights.")
    lr_scheduler: Scheduler = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    warmup_steps: int = Field(0, ge=0, description="Warmup in steps; when > 0, used instead of warmup_ratio.")
    batch_size: int = Field(4, ge=1, le=2**16, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(
        4, ge=1, description="Forward passes per optimizer step. Effective batch = batch_size x this x devices."
    )
    optimizer: Optimizer = Field(
        "paged_adamw_8bit", description="Optimizer. paged_* variants spill state to CPU instead of running out of memory."
    )
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay on adapter weights.")
    max_grad_norm: float = Field(0.3, gt=0, description="Gradient clipping norm (0.3 as in the QLoRA paper).")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: much less memory, about 30% slower."
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (less memory, faster on GPUs). Needs a CUDA "
        "GPU and the liger extra: pip install 'qlora-cli[liger]'.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the model with torch.compile: faster steps after a compile of a minute or more at the "
        "start (and again for each new sequence shape without packing).",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for adapter init, data order and dropout.")
    logging_steps: int = Field(10, ge=1, description="Log loss, learning rate and throughput every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate on the validation rows every N steps (always once at the end)."
    )
    eval_on_start: bool = Field(
        True, description="Also evaluate before the first step, so the log shows the base model's loss to beat."
    )
    save_steps: int = Field(200, ge=1, description="Write a checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints (oldest deleted).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers to send metrics to, besides metrics.jsonl."
    )


class DistributedSection(Section):
    """How several processes share the work. Used only under a launcher (torchrun, accelerate launch,
    or `qlora train --nproc N`); a single process ignores it apart from validation."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp",
        description="ddp: each process holds the whole 4-bit model and trains on its share of each batch "
        "(the usual choice while the model fits one GPU). fsdp: FSDP-QLoRA, the 4-bit weights sharded "
        "across GPUs (for models that do not fit one). deepspeed: DeepSpeed with deepspeed_config.",
    )
    fsdp_cpu_offload: bool = Field(
        False, description="FSDP only: keep the sharded parameters in CPU RAM between uses. Fits bigger models; slower."
    )
    deepspeed_config: str | None = Field(
        None,
        description="DeepSpeed only: path to a DeepSpeed JSON config (ZeRO stage and so on); "
        "configs/deepspeed/zero3.json is an example. Batch, accumulation, clipping and precision are "
        "left as \"auto\" there: the recipe sets them.",
    )

    @property
    def sharded(self) -> bool:
        """FSDP and DeepSpeed split the model across processes; DDP keeps a whole replica in each."""
        return self.strategy in ("fsdp", "deepspeed")


class OutputSection(Section):
    """Where the run directory goes."""

    dir: str = Field("runs/qlora", description="Run directory. Must not exist yet, or be empty.")


class Recipe(Section):
    """A complete QLoRA fine-tuning run."""

    model: ModelSection = Field(description="Which base model to load, and how (hub id or local directory, dtype).")
    quant: QuantSection = Field(default_factory=QuantSection, description="4-bit quantization of the base model.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapter settings.")
    data: DataSection = Field(description="Training data: sources, template, sequence length, validation rows.")
    train: TrainSection = Field(default_factory=TrainSection, description="Training loop settings.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Multi-process training: DDP, FSDP-QLoRA or DeepSpeed."
    )
    output: OutputSection = Field(default_factory=OutputSection, description="Run directory.")

    @model_validator(mode="after")
    def _resolve_storage_dtype(self) -> "Recipe":
        # FSDP flattens each wrapped layer's parameters into one tensor, and ZeRO-3 partitions
        # them: both take only floating-point tensors of one dtype ("Cannot flatten integer dtype
        # tensors", fsdp_qlora#26). bitsandbytes can pack 4-bit values into any container
        # (bnb_4bit_quant_storage), so under those strategies the container is the model's dtype.
        # Resolved here so recipe.yaml records the concrete value the run used.
        if self.quant.storage_dtype == "auto":
            self.quant.storage_dtype = self.model.dtype if self.distributed.sharded else "uint8"
        return self

    def to_yaml(self) -> str:
        """The fully resolved recipe (defaults included), in section order, loadable by `load_recipe`."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def with_absolute_paths(self) -> "Recipe":
        """A copy whose local paths (model, data files, template file, output) are absolute.

        Relative paths are relative to where `qlora train` ran; the run directory's recipe.yaml
        must work from anywhere (`qlora merge /abs/run` from another directory), so it stores
        them resolved. Hub ids are left alone.
        """
        from qlora_cli.data.sources import is_hub_id

        def absolute(path: str) -> str:
            return str(Path(path).expanduser().absolute())

        r = self.model_copy(deep=True)
        if Path(r.model.name_or_path).expanduser().exists():
            r.model.name_or_path = absolute(r.model.name_or_path)
        for source in [*r.data.sources, *r.data.val_sources]:
            if not is_hub_id(source.path):
                source.path = absolute(source.path)
        if r.data.template and Path(r.data.template).expanduser().is_file():
            r.data.template = absolute(r.data.template)
        if r.distributed.deepspeed_config:
            r.distributed.deepspeed_config = absolute(r.distributed.deepspeed_config)
        r.output.dir = absolute(r.output.dir)
        return r


# Why each upper bound exists, for its error message. Each is far above any real run, and each
# stops a value that otherwise ends in a traceback, some after the run directory was made.
_WHY_AT_MOST = {
    # 2^31 overflows the int32 token offsets of the tokenized data; from about 10^9 the length
    # histogram alone runs out of memory.
    (DataSection, "max_seq_len"): "That is longer than any model's context window (the longest are about a "
    "million tokens): set it to at most your model's max_position_embeddings.",
    # Adam's first step moves weights by about 10x the rate: above about 3e37 that overflows float32
    # inside the optimizer. 1e3 itself stays allowed (the divergence tests use it).
    (TrainSection, "learning_rate"): "LoRA learning rates are about 1e-5 to 1e-2 (the QLoRA paper's is 2e-4), "
    "and much larger ones diverge at the first step. Did the exponent lose its minus (2e4 for 2e-4)?",
    # r=100000 allocates gigabytes per layer and failed with a traceback; and a rank above a layer's
    # smaller dimension adds memory but no capacity (modeling.check_rank_fits, against the real layers).
    (LoraSection, "r"): "An adapter's rank cannot usefully exceed its layer's smaller dimension (4096 in a "
    "7B model), and ranks of 8 to 256 are usual.",
    # Above sys.maxsize the DataLoader's sampler fails (islice).
    (TrainSection, "batch_size"): "No accelerator holds that many examples in one forward pass: for a "
    "larger effective batch, raise train.gradient_accumulation_steps.",
    # The sampled row indices are built in memory (numpy MemoryError at 10^12).
    (DataSource, "samples"): "The sampled rows are indexed in memory, and fine-tuning sets are rarely over a "
    "few million rows.",
    (DataSource, "weight"): "Every row would be repeated more than 1,000 times: use samples for an exact count.",
}


# ---------------------------------------------------------------------------------------------
# Cross-field rules. Each returns the problems it finds; each message says what to do.
# They run only when every field is individually valid, so they can trust the types.


def _rule_eval_needs_validation_rows(r: Recipe):
    if r.train.eval_steps is not None and r.data.val_size == 0 and not r.data.val_sources:
        yield Problem(
            "train.eval_steps",
            "is set but there are no validation rows: set data.val_size (e.g. 0.05) or data.val_sources",
        )


def _rule_one_validation_set(r: Recipe):
    if r.data.val_size > 0 and r.data.val_sources:
        yield Problem("data.val_sources", "set either val_sources or val_size, not both (remove one)")


def _rule_weight_or_samples(r: Recipe):
    for key in ("sources", "val_sources"):
        for i, s in enumerate(getattr(r.data, key)):
            if s.weight is not None and s.samples is not None:
                yield Problem(f"data.{key}[{i}].samples", "set either weight or samples, not both (remove one)")


def _rule_roles_need_conversations(r: Recipe):
    for key in ("sources", "val_sources"):
        for i, s in enumerate(getattr(r.data, key)):
            if s.roles and s.format not in ("sharegpt", "messages"):
                yield Problem(f"data.{key}[{i}].roles", f"only sharegpt and messages data have roles, not {s.format}")


def _rule_one_warmup(r: Recipe):
    # warmup_ratio has a default, so only an explicitly written ratio conflicts with warmup_steps.
    t = r.train
    if t.warmup_steps > 0 and t.warmup_ratio > 0 and "warmup_ratio" in t.model_fields_set:
        yield Problem("train.warmup_steps", "set either warmup_steps or warmup_ratio, not both (remove one)")


def _rule_no_adapter_on_output_head(r: Recipe):
    targets = r.lora.target_modules
    if isinstance(targets, list) and "lm_head" in targets:
        yield Problem(
            "lora.target_modules",
            "PEFT cannot put an adapter on lm_head: list it under lora.modules_to_save to train it in full",
        )


def _rule_text_has_no_template(r: Recipe):
    if r.data.template is not None and all(s.format == "text" for s in [*r.data.sources, *r.data.val_sources]):
        yield Problem("data.template", "the text format is trained as plain text and uses no template: remove it")


def _rule_one_template_family(r: Recipe):
    # One run, one template: generate/eval must render prompts exactly as training did. Mixing
    # plain text with templated rows is fine; mixing two formats with different default
    # templates needs an explicit choice.
    sources = [*r.data.sources, *r.data.val_sources]
    defaults = {_DEFAULT_TEMPLATE[s.format] for s in sources if s.format != "text"}
    if r.data.template is None and len(defaults) > 1:
        yield Problem(
            "data.template",
            f"the sources' formats imply different templates ({', '.join(sorted(defaults))}): set one explicitly",
        )


def _rule_dora_bias(r: Recipe):
    if r.lora.use_dora and r.lora.bias != "none":
        yield Problem("lora.bias", "DoRA does not support training biases in PEFT: set lora.bias to none")


def _rule_fsdp_uniform_dtype(r: Recipe):
    if r.distributed.strategy == "fsdp" and r.quant.storage_dtype != r.model.dtype:
        yield Problem(
            "quant.storage_dtype",
            f"is {r.quant.storage_dtype}, but FSDP needs every parameter in one float dtype (\"Cannot flatten "
            f"integer dtype tensors\"): set it to {r.model.dtype} like model.dtype, or remove it (auto)",
        )


def _rule_fsdp_optimizer(r: Recipe):
    if r.distributed.strategy == "fsdp" and r.train.optimizer in ("paged_adamw_8bit", "adamw_8bit"):
        yield Problem(
            "train.optimizer",
            f"{r.train.optimizer} fails when FSDP-QLoRA saves a checkpoint (8-bit optimizer state cannot be "
            "gathered; PEFT's FSDP notes): use adamw_torch or paged_adamw_32bit",
        )


def _rule_strategy_options(r: Recipe):
    d = r.distributed
    if d.strategy == "deepspeed" and d.deepspeed_config is None:
        yield Problem("distributed.deepspeed_config", "is required by strategy deepspeed: point it at a DeepSpeed "
                      "JSON config (configs/deepspeed/zero3.json is an example)")
    if d.deepspeed_config is not None and d.strategy != "deepspeed":
        yield Problem("distributed.deepspeed_config", f"is only used by strategy deepspeed, not {d.strategy}: "
                      "remove it, or set distributed.strategy: deepspeed")
    if d.fsdp_cpu_offload and d.strategy != "fsdp":
        yield Problem("distributed.fsdp_cpu_offload", f"is only used by strategy fsdp, not {d.strategy}: "
                      "remove it, or set distributed.strategy: fsdp")


RULES = [
    _rule_eval_needs_validation_rows,
    _rule_one_validation_set,
    _rule_weight_or_samples,
    _rule_roles_need_conversations,
    _rule_one_warmup,
    _rule_no_adapter_on_output_head,
    _rule_text_has_no_template,
    _rule_one_template_family,
    _rule_dora_bias,
    _rule_fsdp_uniform_dtype,
    _rule_fsdp_optimizer,
    _rule_strategy_options,
]

# Which template each format gets when data.template is null (data/templates.py defines them).
_DEFAULT_TEMPLATE = {"alpaca": "alpaca", "sharegpt": "chatml", "messages": "chatml", "prompt_completion": "raw"}


def default_template(recipe: Recipe) -> str | None:
    """The template a recipe trains with: data.template, or the default of its formats."""
    if recipe.data.template is not None:
        return recipe.data.template
    for source in [*recipe.data.sources, *recipe.data.val_sources]:
        if source.format != "text":
            return _DEFAULT_TEMPLATE[source.format]
    return None


# ---------------------------------------------------------------------------------------------
# Loading: YAML (with line numbers) -> overrides -> one validation.


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe. Raises `UserError` listing every problem found."""
    path = Path(path)
    data, lines = _read_yaml(path)
    overridden = _apply_overrides(data, overrides)
    return validate_recipe(data, lines, overridden)


def validate_recipe(data: dict, lines: dict[tuple, int] | None = None, overridden: set[tuple] = frozenset()) -> Recipe:
    """Validate a recipe mapping; `lines` maps key paths to YAML lines for the messages."""
    lines = lines or {}

    def locate(loc: tuple) -> tuple[str, int | None]:
        where = _dotted(loc)
        if any(loc[:i] in overridden for i in range(1, len(loc) + 1)):
            return where + " (from --set)", None
        for i in range(len(loc), 0, -1):  # the deepest key that exists in the file
            if loc[:i] in lines:
                return where, lines[loc[:i]]
        return where, None

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems, seen = [], set()
        for err in sorted(exc.errors(), key=lambda e: e["type"] != "literal_error"):
            loc = tuple(err["loc"])
            # Pydantic reports union members as extra loc parts ("list[str]", "literal[...]");
            # drop them, they are not keys the user wrote. One message per key: for a union,
            # the literal choice ("must be one of 'all-linear'") is the most useful one.
            loc = tuple(p for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[]"))
            if loc in seen:
                continue
            seen.add(loc)
            where, line = locate(loc)
            problems.append(Problem(where, _message(err, loc), line))
        problems.sort(key=lambda p: p.line if p.line is not None else float("inf"))  # file order
        raise UserError(problems, header="The recipe has problems:") from None

    problems = []
    for rule in RULES:
        for p in rule(recipe):
            where, line = locate(tuple(_parse_key(p.where)))
            problems.append(Problem(where, p.message, line))
    if problems:
        raise UserError(problems, header="The recipe has problems:")
    return recipe


def _message(err: dict, loc: tuple) -> str:
    """Turn a pydantic error into a sentence that says what to do."""
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        key = str(loc[-1])
        known = list(parent.model_fields) if parent else []
        near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f"did you mean '{near[0]}'?" if near else f"valid keys here: {', '.join(known)}"
        return f"unknown key — {hint}"
    if kind == "missing":
        field = _field_at(loc)
        desc = f" ({field.description})" if field is not None and field.description else ""
        return f"required key is missing{desc}"
    if kind == "literal_error":
        return f"{err['msg'].replace('Input should be', 'must be one of')}; got {err['input']!r}"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    if kind == "too_short":
        return f"needs at least {err.get('ctx', {}).get('min_length', 1)} entry; got an empty list"
    if err.get("input", "") is None and not kind.startswith("none"):
        field = _field_at(loc)
        if field is None or field.is_required():
            return "has no value: give one"
        default = "" if field.default is PydanticUndefined else f" ({field.default!r})"
        return f"has no value: give one, or remove the key to use the default{default}"
    if kind == "less_than_equal":
        why = _WHY_AT_MOST.get((_model_at(loc[:-1]), loc[-1]))
        if why is not None:
            return f"must be at most {_readable(err['ctx']['le'])}; got {err['input']!r}. {why}"
    # Type and range errors: "must be greater than 0; got -1".
    return f"{err['msg'].replace('Input should be', 'must be')}; got {err.get('input')!r}"


def _readable(number) -> str:
    """1048576 -> '1,048,576'; 1000.0 -> '1,000'."""
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    return f"{number:,}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The schema class that the key path `loc` points into (None if it is not a section)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = _section_type(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _field_at(loc: tuple):
    parent = _model_at(loc[:-1])
    return parent.model_fields.get(loc[-1]) if parent is not None else None


def _section_type(annotation):
    """Unwrap list[X] / X | None to the section class X, if any."""
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(recipe)"


def _parse_key(dotted: str) -> list:
    """'data.sources[0].path' -> ['data', 'sources', 0, 'path']"""
    parts: list = []
    for i, chunk in enumerate(dotted.split(".")):
        name, *idx = chunk.replace("]", "").split("[")
        if name:
            parts.append(name)
        elif i > 0 or not idx:  # 'lora..r' or '.r': an empty key
            raise ValueError(f"empty key in {dotted!r}")
        indices = [int(j) for j in idx]
        if any(j < 0 for j in indices):
            raise ValueError(f"negative index in {dotted!r}")
        parts += indices
    return parts


def _read_yaml(path: Path) -> tuple[dict, dict[tuple, int]]:
    """Parse the recipe safely and record the line of every key, for error messages."""
    if not path.is_file():
        hint = "it is a directory" if path.is_dir() else "no such file"
        raise UserError.single(str(path), f"cannot read recipe: {hint}. Pass the path of a .yaml recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError.single(str(path), "is not a text file: a recipe is UTF-8 YAML") from None
    try:
        data, lines, duplicates = _parse_yaml(text)
    except YamlAliasError as exc:
        raise UserError.single(f"{path}:{exc.mark.line + 1}", exc.message) from None
    except RecursionError:  # the composer recurses once per level; recursive aliases are caught above
        raise UserError.single(str(path), "is nested too deeply to read (hundreds of levels of brackets or "
                               "indentation): a recipe is a few levels deep, so check its brackets") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError.single(where, f"invalid YAML: {problem}. Check indentation and quoting") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a value of type {type(data).__name__}"
        raise UserError.single(str(path), f"a recipe must be a mapping of sections (model:, data:, ...); this is {kind}")
    if duplicates:  # PyYAML silently keeps the last of two equal keys; that hides edits
        raise UserError(duplicates, header="The recipe has problems:")
    return data, lines


# ---------------------------------------------------------------------------------------------
# Aliases. YAML lets `*name` stand for a whole anchored value, and an anchor may itself hold
# aliases, so nine short lines can stand for 10^9 values ("billion laughs"). PyYAML shares one
# object per anchor, which stays small, but everything after it walks the expanded tree: the line
# map below, pydantic, the error messages. A recipe is a few hundred values, and reusing a list or
# a column mapping a few times adds tens, so what aliases add to one document is bounded, and
# counted while composing, before any of that walks it.

MAX_ALIAS_EXPANSION = 10_000  # values that aliases may add to one YAML document


class YamlAliasError(Exception):
    """An alias bomb or a recursive alias, at `mark` (a PyYAML position)."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark = mark
        self.message = message


class _BoundedAliasLoader(yaml.SafeLoader):
    """SafeLoader that counts the values aliases expand to, and refuses an alias bomb or an alias
    used inside its own anchor, at the alias that does it."""

    def __init__(self, text: str):
        super().__init__(text)
        self.expanded = 0  # values added by the aliases composed so far
        self._sizes: dict[int, int] = {}  # id(node) -> values in its full expansion (nodes are kept alive)
        self._open: set[str] = set()  # anchors whose value is still being composed

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                # PyYAML builds a cyclic structure that every later walk recurses into forever.
                raise YamlAliasError(event.start_mark, f"the alias *{event.anchor} is used inside its own anchor "
                                     f"&{event.anchor}, so it refers to itself and never ends: remove it")
            if event.anchor in self.anchors:  # else PyYAML reports the undefined alias
                self.expanded += self._size(self.anchors[event.anchor])
                if self.expanded > MAX_ALIAS_EXPANSION:
                    raise YamlAliasError(event.start_mark, (
                        f"YAML aliases expand to more than {MAX_ALIAS_EXPANSION:,} values (aliases of "
                        "anchors that hold aliases multiply: an alias bomb). A recipe needs a few hundred: write "
                        "the values out, or reuse anchors less"))
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        if anchor is None:
            return super().compose_node(parent, index)
        self._open.add(anchor)  # PyYAML refuses a duplicate anchor, so names are unique
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.discard(anchor)

    def _size(self, node) -> int:
        """Values in the full expansion of `node`, itself included; memoized, as anchors share nodes."""
        size = self._sizes.get(id(node))
        if size is None:
            if isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._size(key) + self._size(value) for key, value in node.value)
            elif isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._size(item) for item in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
        return size


def _parse_yaml(text: str) -> tuple[Any, dict[tuple, int], list[Problem]]:
    """Parse a YAML document once: its Python value, the line of every key path, and the keys
    written twice in one mapping.

    Raises YamlAliasError for an alias bomb or a recursive alias, and yaml.YAMLError for bad YAML.
    The value is a tree: a value reused through an alias is copied, so that `--set` on one key path
    changes that path only, not every place the anchor was used.
    """
    loader = _BoundedAliasLoader(text)
    try:
        node = loader.get_single_node()
        # Lines before constructing: construction merges `<<: *anchor` keys into the mapping node
        # in place, which would make a key that overrides a merged one look written twice.
        lines: dict[tuple, int] = {}
        duplicates: list[Problem] = []
        _collect_lines(node, (), lines, duplicates)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return _unshared(data), lines, duplicates


def _unshared(value):
    if isinstance(value, dict):
        return {key: _unshared(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_unshared(item) for item in value]
    return value


def _collect_lines(node, prefix: tuple, out: dict, duplicates: list) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            line = key.start_mark.line + 1
            if path in out:
                duplicates.append(Problem(_dotted(path), f"appears twice (also on line {out[path]}): keep one", line))
            out[path] = line
            _collect_lines(value, path, out, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _collect_lines(item, prefix + (i,), out, duplicates)


def _apply_overrides(data: dict, overrides) -> set[tuple]:
    """Apply `--set a.b.c=value` in order. Values are parsed as YAML: 8 -> int, true -> bool, [a, b] -> list."""
    touched: set[tuple] = set()
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(f"--set {item}", "expected KEY=VALUE with a dotted key, e.g. lora.r=8"))
            continue
        try:
            path = _parse_key(key.strip())
            value = _parse_yaml(raw)[0] if raw.strip() else None  # a value's own lines do not matter
        except YamlAliasError as exc:
            problems.append(Problem(f"--set {item}", exc.message))
            continue
        except (ValueError, yaml.YAMLError, RecursionError):
            problems.append(Problem(f"--set {item}", "could not parse; expected e.g. data.sources[0].path=x.jsonl"))
            continue
        node: Any = data
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path[: i + 1]))} does not exist"))
                    break
                node = node[part]
                continue
            if not isinstance(node, dict):
                problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path[:i]))} is not a section"))
                break
            if node.get(part) is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        else:
            last = path[-1]
            if isinstance(last, int):
                if isinstance(node, list) and last < len(node):
                    node[last] = value
                else:
                    problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path))} does not exist"))
                    continue
            elif isinstance(node, dict):
                node[last] = value
            else:
                problems.append(Problem(f"--set {item}", f"{_dotted(tuple(path[:-1]))} is not a section"))
                continue
            touched.add(tuple(path))
    if problems:
        raise UserError(problems, header="Bad --set overrides:")
    return touched


def json_schema() -> dict:
    """The JSON Schema of a recipe, for editors and `qlora schema`."""
    return Recipe.model_json_schema()
