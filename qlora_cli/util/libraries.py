"""The libraries qlora stands on: their versions, as recorded in summary.json and merge_report.json."""

from __future__ import annotations

import platform


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("qlora-cli", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# --- Private library APIs -------------------------------------------------------------------------
# Every place qlora reaches inside a library, with why. A release that renames one of these breaks
# exact resume or atomic checkpoints silently, so `private_apis_missing()` checks them all (the test
# suite pins it: tests/test_library_contracts.py) and the trainer refuses to start without them.
# Reading one of these anywhere else is a defect: add it here first.

PRIVATE_APIS = [
    # (library, owner, name, where used and why)
    ("transformers", "Trainer", "_save_checkpoint(model, trial)",
     "train/trainer.py: checkpoints are written to a staging directory and renamed into place whole"),
    ("transformers", "Trainer", "_get_output_dir(trial)",
     "train/trainer.py: points the checkpoint writer at the staging directory"),
    ("transformers", "Trainer", "self._tr_loss",
     "train/trainer.py: the loss summed since the last log, saved with a checkpoint for exact resume"),
    ("transformers", "Trainer", "self._globalstep_last_logged", "train/trainer.py: the same window's start"),
    ("transformers", "Trainer", "self._total_loss_scalar", "train/trainer.py: keeps summary.json's mean loss per call"),
    ("trl", "SFTTrainer", "self._metrics", "train/trainer.py: TRL's per-step metrics in the same window"),
    ("trl", "SFTTrainer", "self._total_train_tokens", "train/trainer.py: TRL's running token count"),
    ("trl", "DPOTrainer", "self._metrics", "train/preference.py: the same log window, for DPO's figures"),
    ("trl", "DPOTrainer", "self._total_train_tokens", "train/preference.py: the same token count"),
    ("trl", "DPOTrainer", "_prepare_dataset(dataset, processing_class, args, dataset_name)",
     "train/preference.py: rows arrive tokenized with the run's template, so TRL's tokenization is skipped"),
    ("trl", "KTOTrainer", "self._metrics", "train/preference.py: the same log window, for KTO's figures"),
    ("trl", "KTOTrainer", "_prepare_dataset(dataset, processing_class, args, dataset_name)",
     "train/preference.py: the same, and KTO's KL completions built as TRL builds them"),
    ("trl", "ORPOTrainer", "self._stored_metrics", "train/preference.py: experimental ORPO's name for _metrics"),
    ("datasets", "Dataset", "_indices", "data/pipeline.py: a column in row order with one Arrow take"),
    ("datasets", "Dataset", "_fingerprint", "data/cache.py: a hub dataset's identity in the cache key"),
]


def dataset_row_order(ds):
    """The Arrow indices `select`/`shuffle`/`train_test_split` set on DS (None: table order)."""
    return ds._indices


def dataset_fingerprint(ds) -> str:
    return ds._fingerprint


def private_apis_missing() -> list[str]:
    """The entries of PRIVATE_APIS the installed libraries no longer have, as readable lines."""
    import inspect

    from datasets import Dataset
    from transformers import Trainer
    import warnings

    from trl import DPOTrainer, KTOTrainer, SFTTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL warns that its experimental trainers may change
        from trl.experimental.orpo import ORPOTrainer

    owners = {"Trainer": Trainer, "SFTTrainer": SFTTrainer, "DPOTrainer": DPOTrainer, "KTOTrainer": KTOTrainer,
              "ORPOTrainer": ORPOTrainer}
    missing = []
    probe = Dataset.from_dict({"x": [0, 1]}).select([1, 0])
    for library, owner, name, _ in PRIVATE_APIS:
        if owner == "Dataset":
            ok = hasattr(probe, name) and getattr(probe, name) is not None
        elif name.startswith("self."):  # an attribute the class sets: look for the assignment in its source
            attr = name.removeprefix("self.")
            ok = any(f"self.{attr} =" in inspect.getsource(cls) or f"self.{attr}=" in inspect.getsource(cls)
                     for cls in owners[owner].__mro__ if cls.__module__.startswith(library))
        else:  # a method with these parameters
            method, params = name.split("(")
            fn = getattr(owners[owner], method, None)
            expected = [p.strip() for p in params.rstrip(")").split(",")]
            ok = fn is not None and list(inspect.signature(fn).parameters)[1:len(expected) + 1] == expected
        if not ok:
            missing.append(f"{library} {library_versions().get(library)}: {owner}.{name.removeprefix('self.')} "
                           f"({_why(library, owner, name)})")
    return missing


def _why(library: str, owner: str, name: str) -> str:
    return next(why for lib, own, n, why in PRIVATE_APIS if (lib, own, n) == (library, owner, name))
