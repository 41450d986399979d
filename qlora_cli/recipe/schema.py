"""The recipe's schema: its sections, their keys with types, defaults and descriptions, and the
rules that relate keys to each other. Reading a YAML file into a `Recipe` is recipe/load.py.

The schema is the documentation: every field has a type, a default and a description, and the
JSON Schema (`qlora schema`) is generated from these classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from qlora_cli.errors import Problem

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
        description="dtype of the layers that are not quantized (embeddings, norms, lm_head). Under bf16 (or, on "
        "a GPU, fp16) compute, training keeps the frozen embeddings and lm_head in it (half the memory of fp32; "
        "autocast computes the same logits); norms, adapters and modules_to_save train in fp32.",
    )
    trust_remote_code: bool = Field(
        False, description="Declare that the model needs the Python code shipped inside its repository. The code "
        "runs only when the command line also says --trust-remote-code; only give it for code you trust.",
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel. null lets transformers pick (sdpa where available)."
    )
    adapter: str | None = Field(
        None,
        description="Continue training this LoRA adapter instead of a fresh one: a qlora run directory (its "
        "template is used too, unless data.template is set) or a PEFT adapter directory. The usual start of "
        "preference tuning (train.method: dpo) is the SFT run's directory. The lora section must match the "
        "adapter's rank, alpha, target and saved modules.",
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


DataFormat = Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference", "unpaired"]
# Formats for preference tuning (train.method dpo, orpo, kto): data/preference.py reads them.
PREFERENCE_FORMATS = ("preference", "unpaired")
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
        "text: plain text, trained in full. preference (dpo, orpo, kto): a prompt with a chosen and a rejected "
        "reply, as prompt/chosen/rejected (strings or conversations), or conversations or messages plus "
        "chosen/rejected. unpaired (kto): messages or conversations ending in the judged reply, plus a boolean "
        "label (or prompt/completion/label)."
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
    on_too_long: Literal["truncate", "drop", "error", "split"] = Field(
        "truncate",
        description="Examples longer than max_seq_len: truncate them (keep the start), drop them, stop with "
        "an error naming them, or split them into max_seq_len blocks that are all trained (continued "
        "pre-training on long documents: text format with packing only; TRL's bfd_split packing). "
        "Truncated examples left with no response token are dropped. Counts go to the run summary.",
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

    @property
    def split_block(self) -> int | None:
        """The block length long documents are cut into (on_too_long: split), else None."""
        return self.max_seq_len if self.on_too_long == "split" else None


Optimizer = Literal[
    "paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch", "adamw_torch_fused", "adafactor", "sgd"
]
Scheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]


class TrainSection(Section):
    """The optimisation loop (run by TRL's SFTTrainer, or its preference trainers)."""

    method: Literal["sft", "dpo", "orpo", "kto"] = Field(
        "sft",
        description="What is trained: sft (supervised fine-tuning on replies, TRL's SFTTrainer), or preference "
        "tuning on preference/unpaired data with the settings of the preference section: dpo (TRL's DPOTrainer), "
        "orpo (TRL's ORPOTrainer: SFT and preference in one, no reference), kto (TRL's KTOTrainer, unpaired "
        "good/bad replies). The reference of dpo and kto is the starting adapter frozen (the base itself when "
        "the adapter is fresh): the base model is never loaded twice.",
    )
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
    loss_path: Literal["auto", "fused", "plain"] = Field(
        "auto",
        description="How the loss is computed from the output layer. fused: TRL's chunked LM head, which never "
        "holds the full (batch, sequence, vocabulary) logits (a Triton kernel on CUDA) and also logs token accuracy "
        "and entropy; plain: transformers' loss on the full logits, faster where the fused head has no kernel (on "
        "the CPU the fused head makes the tiny recipe's steps 1.6x as long: benchmarks/bench_loss_path.py); auto: "
        "fused on CUDA, plain elsewhere. The loss is the same either way.",
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


class PreferenceSection(Section):
    """Preference tuning's settings (train.method dpo, orpo or kto); ignored by sft."""

    beta: float = Field(
        0.1, gt=0, le=100,
        description="How far the policy may move from the reference (dpo, kto: the KL weight; orpo: the weight "
        "of the odds-ratio term, TRL's beta, the ORPO paper's lambda).",
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "apo_zero", "apo_down"] = Field(
        "sigmoid",
        description="dpo only: the loss TRL's DPOTrainer computes. sigmoid: the DPO paper's; ipo: IPO (beta is its "
        "regulariser); hinge: SLiC; robust: noise-robust DPO (with label_smoothing); sigmoid_norm: length-"
        "normalised; apo_zero/apo_down: anchored preference optimisation.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="dpo with loss_type sigmoid or robust: the assumed share of flipped labels."
    )
    rpo_alpha: float | None = Field(
        None, gt=0, le=100,
        description="dpo only: also train the chosen reply by negative log-likelihood, weighted by this (RPO; TRL's "
        "loss_type [sigmoid, sft] with loss_weights [1, rpo_alpha]). null = no such term.",
    )
    desirable_weight: float = Field(1.0, gt=0, le=100, description="kto only: weight of the desirable replies' loss.")
    undesirable_weight: float = Field(
        1.0, gt=0, le=100, description="kto only: weight of the undesirable replies' loss."
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
    preference: PreferenceSection = Field(
        default_factory=PreferenceSection, description="DPO, ORPO and KTO settings (train.method)."
    )
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
        """The fully resolved recipe (defaults included), in section order, loadable by `load_recipe`.
        A template left to the format's default says which one that is, in a comment."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if self.data.template is None and (chosen := default_template(self)) is not None:
            text = text.replace("\n  template: null\n", f"\n  template: null  # the format's default: {chosen}\n", 1)
        return text

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
        if r.model.adapter and Path(r.model.adapter).expanduser().exists():
            r.model.adapter = absolute(r.model.adapter)
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
            if s.roles and s.format not in ("sharegpt", "messages", *PREFERENCE_FORMATS):
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


def _rule_split_is_for_packed_text(r: Recipe):
    # Splitting a conversation would train its later blocks without the prompt they answer; and
    # only packing (TRL's bfd_split) splits: without it TRL truncates every example to max_length.
    if r.data.on_too_long != "split":
        return
    chats = sorted({s.format for s in [*r.data.sources, *r.data.val_sources] if s.format != "text"})
    if chats:
        yield Problem("data.on_too_long", f"split is for plain text (format: text), not {', '.join(chats)}: a "
                      "conversation's later blocks would lose their prompt; use truncate, drop or error")
    if not r.data.packing:
        yield Problem("data.on_too_long", "split needs data.packing: true (the blocks are packed; without packing "
                      "every example is cut to max_seq_len)")


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


def _rule_method_matches_formats(r: Recipe):
    # The preference trainers score a chosen against a rejected reply: SFT rows have no rejected one,
    # and SFT cannot train a rejected reply. KTO alone reads unpaired rows (a pair is two of them).
    wanted = {"sft": None, "dpo": ("preference",), "orpo": ("preference",), "kto": ("preference", "unpaired")}
    allowed = wanted[r.train.method]
    for key in ("sources", "val_sources"):
        for i, s in enumerate(getattr(r.data, key)):
            if allowed is None and s.format in PREFERENCE_FORMATS:
                yield Problem(f"data.{key}[{i}].format", f"{s.format} data is for preference tuning: set "
                              "train.method to dpo, orpo or kto (or use an SFT format)")
            elif allowed is not None and s.format not in allowed:
                yield Problem(f"data.{key}[{i}].format", f"train.method {r.train.method} trains on "
                              f"{' or '.join(allowed)} data, not {s.format}")


def _rule_preference_options(r: Recipe):
    p, method = r.preference, r.train.method
    if method == "sft":
        return
    # A value other than the default, not merely a key written: recipe.yaml writes every key.
    only = {"loss_type": ("dpo",), "label_smoothing": ("dpo",), "rpo_alpha": ("dpo",),
            "desirable_weight": ("kto",), "undesirable_weight": ("kto",)}
    for key, methods in only.items():
        if getattr(p, key) != PreferenceSection.model_fields[key].default and method not in methods:
            yield Problem(f"preference.{key}", f"is only used by train.method {' or '.join(methods)}, not {method}: "
                          "remove it")
    if p.label_smoothing > 0 and p.loss_type not in ("sigmoid", "robust"):
        yield Problem("preference.label_smoothing", f"is only used by loss_type sigmoid or robust, not {p.loss_type}")
    if method == "kto" and r.train.batch_size < 2:
        yield Problem("train.batch_size", "kto estimates its KL term from the other rows of a batch: set at least 2")
    if r.data.packing:
        yield Problem("data.packing", f"train.method {method} scores whole chosen and rejected replies, which TRL "
                      "does not pack: set data.packing: false")
    if r.data.train_on_inputs:
        yield Problem("data.train_on_inputs", f"train.method {method} scores only the replies: remove it")
    if r.data.on_too_long == "split":
        yield Problem("data.on_too_long", f"split cuts plain text, not {method} pairs: use truncate, drop or error")
    if r.distributed.sharded:
        # TRL keeps the reference as a second adapter ("ref") beside the policy: FSDP would shard and
        # gather both, and its checkpoints would hold both; that path is not built or tested here.
        yield Problem("distributed.strategy", f"{r.distributed.strategy} is not supported with train.method "
                      f"{method}: use ddp (each GPU holds the 4-bit model; preference runs fit where SFT fits "
                      "with twice the sequences per batch)")


RULES = [
    _rule_method_matches_formats,
    _rule_preference_options,
    _rule_eval_needs_validation_rows,
    _rule_one_validation_set,
    _rule_weight_or_samples,
    _rule_roles_need_conversations,
    _rule_one_warmup,
    _rule_no_adapter_on_output_head,
    _rule_text_has_no_template,
    _rule_split_is_for_packed_text,
    _rule_one_template_family,
    _rule_dora_bias,
    _rule_fsdp_uniform_dtype,
    _rule_fsdp_optimizer,
    _rule_strategy_options,
]

# Which template each format gets when data.template is null (data/templates.py defines them).
_DEFAULT_TEMPLATE = {"alpaca": "alpaca", "sharegpt": "chatml", "messages": "chatml", "prompt_completion": "raw",
                     "preference": "chatml", "unpaired": "chatml"}


def default_template(recipe: Recipe) -> str | None:
    """The template a recipe trains with: data.template, or the default of its formats."""
    if recipe.data.template is not None:
        return recipe.data.template
    for source in [*recipe.data.sources, *recipe.data.val_sources]:
        if source.format != "text":
            return _DEFAULT_TEMPLATE[source.format]
    return None


def json_schema() -> dict:
    """The JSON Schema of a recipe, for editors and `qlora schema`."""
    return Recipe.model_json_schema()
