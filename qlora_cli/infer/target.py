"""What `eval` and `generate` run on: a run directory, a merged model, or a base model.

    target = load_target("runs/tiny")                  # adapter on the 4-bit base, as trained
    ids = target.prompt_ids("Count from 3 to 7.")      # rendered exactly as training rendered
    target.stop_ids                                    # the tokens that end a reply

The point of this module is that nothing about the prompt format is chosen here: the template,
the Alpaca preamble and the stop token all come from the run's recipe, through the same code
(`prepare_tokenizer`, `Renderer`, `to_canonical`) that training used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.model.location import looks_local
from qlora_cli.outputs.run_dir import MERGE_REPORT, RECIPE



@dataclass
class Target:
    kind: str  # "run", "merged" (has merge_report.json) or "base" (a hub id or any other model directory)
    path: str
    model: object  # PeftModel for a run, else a transformers model
    tokenizer: object
    template: object | None  # data.templates.Template; None = plain text
    recipe: object | None  # the run's Recipe, when known
    adapters: list[str] = field(default_factory=list)  # PEFT adapter names loaded, "default" first
    remote_code_allowed: bool = False  # --trust-remote-code on this command (remote_code.py)
    # Each extra adapter (--adapter NAME=RUN) as its own run sees it: the same model, with that run's
    # tokenizer settings, template and recipe, so its prompts render as its training rendered them.
    views: dict[str, "Target"] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """What a table calls this target: a run directory's own name (runs/tiny -> tiny)."""
        return Path(self.path).name or self.path

    def view(self, adapter: str) -> "Target":
        """The target that renders prompts for `adapter` (the loaded one and the bare base: this one)."""
        return self.views.get(adapter, self)

    @property
    def chat_format(self) -> str | None:
        """The format of the run's first data source (alpaca, messages, ...), when known."""
        return self.recipe.data.sources[0].format if self.recipe is not None else None

    @property
    def stop_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id]
        if self.template is not None and self.template.stop:
            ids.append(self.tokenizer.convert_tokens_to_ids(self.template.stop))
        return sorted({i for i in ids if i is not None})

    def messages_for(self, prompt: str | dict, system: str | None = None) -> list[dict]:
        """A prompt (text, an Alpaca row or a messages row) as the conversation training would render."""
        from qlora_cli.data.formats import to_canonical

        if isinstance(prompt, str):
            prompt = {"instruction": prompt} if self.chat_format == "alpaca" else {"prompt": prompt}
        if "messages" in prompt:
            messages = list(prompt["messages"])
        elif "instruction" in prompt:
            # Training's own conversion, with a placeholder answer that is then dropped.
            messages = to_canonical({"input": "", **prompt, "output": "-"}, "alpaca")["messages"][:-1]
        else:
            messages = [{"role": "user", "content": prompt["prompt"]}]
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        return messages

    def prompt_ids(self, prompt: str | dict | list, system: str | None = None) -> list[int]:
        """Token ids of the prompt, ending where the model's reply begins."""
        from qlora_cli.data.templates import Renderer

        if self.template is None:  # plain-text runs: BOS + text, as training encoded it
            text = prompt if isinstance(prompt, str) else prompt.get("prompt") or prompt.get("text", "")
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            return bos + self.tokenizer.encode(text, add_special_tokens=False)
        messages = prompt if isinstance(prompt, list) else self.messages_for(prompt, system)
        text = Renderer(self.template, self.tokenizer).prompt(messages)
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def load_target(target: str, adapters: dict[str, str] | None = None, where: str = "TARGET",
                trust_remote_code: bool = False) -> Target:
    """Load TARGET as what it is; `adapters` adds more runs' adapters (same base) by name.

    trust_remote_code is the command line's --trust-remote-code: without it, a model that brings
    its own code is refused before anything loads, whatever TARGET's files say (remote_code.py)."""
    path = Path(target).expanduser()
    if (path / RECIPE).is_file() and (path / "adapter_config.json").is_file():
        loaded = _load_run(path, trust_remote_code)
    elif path.is_dir() and (path / "config.json").is_file():
        loaded = _load_merged(path, trust_remote_code)
    elif looks_local(target):
        raise UserError.single(
            where,
            f"{target} holds no model and no adapter: give a run directory (with {RECIPE} and "
            "adapter_config.json), a merged model directory, or a model directory with config.json",
        )
    else:
        loaded = _load_base(target, trust_remote_code)
    loaded.remote_code_allowed = trust_remote_code
    for name, run_dir in (adapters or {}).items():
        _add_adapter(loaded, name, Path(run_dir))
    loaded.model.eval()
    return loaded


def _load_run(path: Path, trust_remote_code: bool) -> Target:
    from peft import PeftModel

    from qlora_cli.model.load import load_base_model
    from qlora_cli.model.remote_code import require_consent
    from qlora_cli.model.tokenizer import prepare_tokenizer
    from qlora_cli.model.location import check_model_path
    from qlora_cli.recipe.load import load_recipe

    recipe = load_recipe(path / RECIPE)
    # The run's recipe.yaml may say trust_remote_code: true; only the command line can allow it.
    require_consent(recipe.model, trust_remote_code, where=f"{path / RECIPE}: model.trust_remote_code")
    check_model_path(recipe.model, where=f"{path / RECIPE}: model.name_or_path")
    check_adapter_files(path, "TARGET")
    tokenizer, template = prepare_tokenizer(recipe)
    model = PeftModel.from_pretrained(load_base_model(recipe.model, recipe.quant), str(path))
    return Target("run", str(path), model, tokenizer, template, recipe, adapters=["default"])


def _load_merged(path: Path, trust_remote_code: bool) -> Target:
    """A merged model (or any saved model). Its run's recipe, when merge_report.json names one,
    gives the template; otherwise the tokenizer's own chat template, if it has one."""
    from qlora_cli.model.remote_code import require_consent_for_directory

    require_consent_for_directory(str(path), trust_remote_code)
    tokenizer, template, recipe = merged_tokenizer(path, trust_remote_code)
    model = _load_model(_ModelRef(str(path), trust_remote_code=trust_remote_code), "TARGET")
    # Without a merge report this is some other saved model: treat it as a base (eval writes
    # nothing into it, and --compare-base has no base to compare with).
    kind = "merged" if (path / MERGE_REPORT).is_file() else "base"
    return Target(kind, str(path), model, tokenizer, template, recipe)


def merged_tokenizer(path: Path, trust_remote_code: bool = False):
    """(tokenizer, template, recipe or None) of a merged model directory: the recipe of the run that
    merge_report.json names, when it is still there, says which template the saved one is."""
    from qlora_cli.data.templates import BUILTINS, resolve_template
    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.recipe.load import load_recipe
    from qlora_cli.recipe.schema import default_template

    recipe = None
    report = path / MERGE_REPORT
    if report.is_file():
        run_recipe = Path(json.loads(report.read_text(encoding="utf-8")).get("run_dir", "")) / RECIPE
        recipe = load_recipe(run_recipe) if run_recipe.is_file() else None
    tokenizer = load_tokenizer(_ModelRef(str(path), trust_remote_code=trust_remote_code))
    # The merged tokenizer carries the run's template; the recipe says which one it is (a built-in
    # knows its stop token), or that the run was plain text and uses none.
    if recipe is not None:
        name = default_template(recipe)
        template = None if name is None else BUILTINS.get(name) or resolve_template("tokenizer", tokenizer)
    else:
        template = resolve_template("tokenizer", tokenizer) if tokenizer.chat_template else None
    return tokenizer, template, recipe


def _load_base(model_id: str, trust_remote_code: bool) -> Target:
    from qlora_cli.data.templates import resolve_template
    from qlora_cli.model.load import load_tokenizer
    from qlora_cli.model.remote_code import require_consent_for_directory

    require_consent_for_directory(model_id, trust_remote_code)
    ref = _ModelRef(model_id, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(ref)
    template = resolve_template("tokenizer", tokenizer) if tokenizer.chat_template else None
    return Target("base", model_id, _load_model(ref, "TARGET"), tokenizer, template, None)


def original_base(target: Target) -> Target:
    """The unquantized base model a merged TARGET came from, rendered with TARGET's tokenizer and template."""
    from qlora_cli.model.remote_code import require_consent
    from qlora_cli.model.location import check_model_path

    model_cfg = target.recipe.model
    require_consent(model_cfg, target.remote_code_allowed, where="--compare-base: the run's model.trust_remote_code")
    check_model_path(model_cfg, where="--compare-base")
    model = _load_model(model_cfg, "--compare-base")
    return Target("base", model_cfg.name_or_path, model.eval(), target.tokenizer, target.template, target.recipe)


def _load_model(ref, where: str):
    """A full-precision model in its saved dtype, on this process's device; a load failure names `where`."""
    from transformers import AutoModelForCausalLM

    from qlora_cli.model.load import device_map

    try:
        return AutoModelForCausalLM.from_pretrained(
            ref.name_or_path, revision=ref.revision, dtype="auto", device_map=device_map(),
            trust_remote_code=ref.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError.single(where, f"could not load the model {ref.name_or_path}: {exc}") from None


def _add_adapter(target: Target, name: str, run_dir: Path) -> None:
    from qlora_cli.model.tokenizer import prepare_tokenizer
    from qlora_cli.recipe.load import load_recipe

    if target.kind != "run":
        raise UserError.single("--adapter", "extra adapters go on a run directory's base: give a run as TARGET")
    if not (run_dir / "adapter_config.json").is_file() or not (run_dir / RECIPE).is_file():
        raise UserError.single("--adapter", f"{name}={run_dir}: not a run directory (no adapter_config.json / {RECIPE})")
    check_adapter_files(run_dir, f"--adapter {name}")
    other = load_recipe(run_dir / RECIPE)
    if (other.model.name_or_path, other.model.revision) != (target.recipe.model.name_or_path, target.recipe.model.revision):
        at = lambda m: m.name_or_path + (f"@{m.revision}" if m.revision else "")  # noqa: E731
        raise UserError.single(
            "--adapter", f"{name}={run_dir} was trained on {at(other.model)}, not on this base ({at(target.recipe.model)})",
        )
    if name in target.adapters:
        raise UserError.single("--adapter", f"the name {name!r} is used twice")
    tokenizer, template = prepare_tokenizer(other)  # the same base's tokenizer, with that run's template
    target.model.load_adapter(str(run_dir), adapter_name=name)
    target.adapters.append(name)
    target.views[name] = replace(target, path=str(run_dir), tokenizer=tokenizer, template=template, recipe=other,
                                 adapters=[name], views={})


def check_adapter_files(run_dir: Path, where: str) -> None:
    """The adapter's two files must be whole before PEFT reads them: a run copied in part, or a
    disk that filled up, leaves a config that is not JSON or weights shorter than their header
    says, and PEFT would fail with a parser's traceback. Reads the header only, not the weights."""
    from safetensors import SafetensorError, safe_open

    config, weights = run_dir / "adapter_config.json", run_dir / "adapter_model.safetensors"
    fix = "copy the run directory again, or train it again (or --resume it, if its checkpoints are there)"
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError.single(where, f"{config} is damaged or incomplete ({exc}): {fix}") from None
    if not isinstance(parsed, dict):
        raise UserError.single(where, f"{config} is not an adapter config (a JSON object): {fix}")
    if not weights.is_file():
        raise UserError.single(where, f"{run_dir} has no {weights.name}: {fix}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            f.keys()
    except (OSError, SafetensorError) as exc:
        raise UserError.single(where, f"{weights} is damaged or incomplete ({exc}): {fix}") from None


@dataclass
class _ModelRef:
    """The `model` section shape that modeling.load_tokenizer expects."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
