"""Python code shipped inside a model repository runs only when the person at the keyboard asks.

A model whose config.json has an `auto_map` brings its own classes: loading it with
`trust_remote_code=True` imports those .py files with the user's permissions. A recipe, or a run
directory someone sent you, is a file, and a file must never grant that. So:

    model.trust_remote_code: true        in a recipe only *declares* that the model needs its code;
    qlora COMMAND ... --trust-remote-code on the command line is the consent, given each time.

Without the flag, every command that would load such a model stops before loading anything
(exit 2) and names the files that would run. This module needs no heavy library, so the check
costs nothing before torch and transformers load.
"""

from __future__ import annotations

import json

from qlora_cli.errors import UserError
from qlora_cli.outputs.served_files import model_file

FLAG = "--trust-remote-code"
FLAG_HELP = ("Allow the model's own Python code (its config's auto_map) to run on this machine. Needed, on "
             "every command, for a model whose recipe sets model.trust_remote_code; never implied by a file.")


def code_files(name_or_path: str, revision: str | None = None) -> list[str]:
    """The Python files a model's auto_map would import, as `file.py` or `repo:file.py`, from its
    config.json and tokenizer_config.json (a local directory, or the hub cache). Empty when they
    cannot be read: then the model has not been downloaded, and what runs is not known here."""
    files: list[str] = []
    for name in ("config.json", "tokenizer_config.json"):
        path = model_file(name_or_path, name, revision)
        if path is None:
            continue
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(auto_map, dict):
            continue
        for value in auto_map.values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str) and "." in ref:
                    # "modeling_x.XForCausalLM", or "other/repo--modeling_x.XForCausalLM" (code from another repo)
                    repo, _, module = ref.rpartition("--")
                    file = module.rsplit(".", 1)[0] + ".py"
                    entry = f"{repo}:{file}" if repo else file
                    if entry not in files:
                        files.append(entry)
    return files


def what_would_run(name_or_path: str, revision: str | None = None) -> str:
    """'Python code from MODEL (configuration_x.py, modeling_x.py)', for messages."""
    at = f"{name_or_path}{'@' + revision if revision else ''}"
    files = code_files(name_or_path, revision)
    listed = ", ".join(files) if files else "its .py files (not downloaded yet, so not listed here)"
    return f"Python code from {at} ({listed})"


def require_consent(model, allowed: bool, where: str = "model.trust_remote_code") -> None:
    """Stop when the recipe's model section declares remote code and the command line did not allow it."""
    if model.trust_remote_code and not allowed:
        raise UserError.single(
            where, f"is true, so loading the model would run {what_would_run(model.name_or_path, model.revision)} "
            f"on this machine with your permissions. If you trust that code, add {FLAG} to this command; "
            "otherwise do not use this model",
        )


def require_consent_for_directory(name_or_path: str, allowed: bool, where: str = "TARGET") -> None:
    """A model given by path or id (not through a recipe): stop when its own config asks for its code."""
    if not allowed and code_files(name_or_path):
        raise UserError.single(
            where, f"{name_or_path} brings its own model code (auto_map in its config): loading it would run "
            f"{what_would_run(name_or_path)} on this machine with your permissions. If you trust that code, "
            f"add {FLAG} to this command",
        )
