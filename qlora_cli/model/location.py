"""Where a model comes from: a local directory or a hub id. The one rule for telling them apart,
and the checks that say what is wrong before anything tries to load it."""

from __future__ import annotations

from pathlib import Path

from qlora_cli.errors import UserError


def looks_local(name_or_path: str) -> bool:
    """A path the user meant as a local directory: it exists, it starts like a path, or it has more
    slashes than a hub id (`org/name`) can."""
    return (Path(name_or_path).expanduser().exists() or name_or_path.startswith((".", "/", "~"))
            or name_or_path.count("/") > 1)


def check_model_path(model, where: str = "model.name_or_path") -> None:
    """A local-looking model path must be a directory with config.json (checked before any work)."""
    path = Path(model.name_or_path).expanduser()
    if not looks_local(model.name_or_path):
        check_hub_model(model, where)
        return
    if not path.is_dir():
        raise UserError.single(where, f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError.single(where, f"{path} has no config.json: point at a saved transformers model directory")


def check_hub_model(model, where: str = "model.name_or_path") -> None:
    """A hub id must be in the local cache, or the hub must be reachable: say which, at once,
    instead of a library's retries and a connection traceback."""
    from huggingface_hub import try_to_load_from_cache

    from qlora_cli.util.hub import hub_host, hub_offline, hub_reachable

    if isinstance(try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision), str):
        return  # cached: works offline
    fix = "pass a local model directory, or set HF_HOME to a cache that holds it"
    if hub_offline():
        raise UserError.single(where, f"{model.name_or_path} is not in the local cache and the hub is switched off "
                               f"(HF_HUB_OFFLINE): {fix}, or unset HF_HUB_OFFLINE")
    if not hub_reachable():
        raise UserError.single(where, f"{model.name_or_path} is not in the local cache and the hub ({hub_host()}) is "
                               f"unreachable: {fix}")
