"""The private library APIs qlora relies on (util/libraries.py's PRIVATE_APIS) exist in the
installed transformers, TRL and datasets, with the signatures and meaning qlora assumes. A release
that changes one fails here, by name, instead of silently breaking exact resume or atomic
checkpoints."""

from __future__ import annotations

from qlora_cli.util.libraries import PRIVATE_APIS, dataset_fingerprint, dataset_row_order, private_apis_missing


def test_every_private_api_qlora_uses_exists_in_the_installed_libraries():
    assert private_apis_missing() == []


def test_the_check_names_an_api_a_release_removed(monkeypatch):
    from transformers import Trainer

    monkeypatch.delattr(Trainer, "_save_checkpoint")
    missing = private_apis_missing()
    assert len(missing) == 1 and "Trainer._save_checkpoint(model, trial)" in missing[0]
    assert missing[0].startswith("transformers ") and "staging directory" in missing[0]


def test_the_registry_lists_exactly_the_private_names_the_package_reads():
    # The attributes read by name in the package are the registered ones, and no others.
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "qlora_cli"
    registered = {name.removeprefix("self.").split("(")[0] for _, _, name, _ in PRIVATE_APIS}
    private_names = {"_save_checkpoint", "_get_output_dir", "_tr_loss", "_globalstep_last_logged",
                     "_total_loss_scalar", "_metrics", "_total_train_tokens", "_indices", "_fingerprint",
                     "_prepare_dataset", "_stored_metrics"}
    assert registered == private_names
    used = set()
    for path in package.rglob("*.py"):
        used |= set(re.findall(r"\.(_[a-z]\w*)\b", path.read_text())) & private_names
    assert used == private_names


def test_dataset_row_order_is_what_select_and_shuffle_set():
    from datasets import Dataset

    ds = Dataset.from_dict({"x": [10, 11, 12, 13]})
    assert dataset_row_order(ds) is None
    picked = ds.select([3, 1])
    assert dataset_row_order(picked).column(0).to_pylist() == [3, 1]
    assert [picked.data.column("x")[i].as_py() for i in dataset_row_order(picked).column(0).to_pylist()] == picked["x"]
    # The fingerprint changes with the content, as the data cache's key assumes.
    assert dataset_fingerprint(ds) != dataset_fingerprint(Dataset.from_dict({"x": [10, 11, 12, 14]}))


def test_the_trainer_log_window_attributes_hold_what_resume_saves():
    # _tr_loss is a tensor summed per step, _globalstep_last_logged an int, _metrics TRL's per-mode
    # dict of lists: the shapes trainer.py's _log_window/_restore_log_window read and write.
    import inspect

    from transformers import Trainer
    from trl import SFTTrainer

    source = inspect.getsource(Trainer)
    assert "self._tr_loss += " in source or "tr_loss += " in source
    assert "self._globalstep_last_logged = self.state.global_step" in source
    sft = "".join(inspect.getsource(c) for c in SFTTrainer.__mro__ if c.__module__.startswith("trl"))
    assert 'self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}' in sft
