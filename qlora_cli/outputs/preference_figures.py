"""The preference figures of a run (summary.json's `preference`), as one line of text for the end
panel, the model card and `qlora eval`. Kept apart from train/preference.py, which imports TRL."""

from __future__ import annotations


def _pair(before: dict | None, after: dict | None, key: str, fmt: str) -> str:
    a = (before or {}).get(key)
    b = (after or {}).get(key)
    if b is None:
        return "n/a"
    return (format(a, fmt) + " → " if a is not None else "") + format(b, fmt)


def preference_line(figures: dict | None) -> str | None:
    """'dpo (beta 0.1): reward accuracy 0.0% → 91.7%, margin 0 → 0.775 on validation pairs; ...'"""
    if not figures:
        return None
    before, after = figures.get("eval_before"), figures.get("eval_after")
    where = "validation pairs"
    if not after:
        before, after, where = figures.get("train_first"), figures.get("train_last"), "training batches (first → last log)"
    text = (f"{figures['method']} (beta {figures['beta']:g}): reward accuracy "
            f"{_pair(before, after, 'rewards/accuracies', '.1%')}, margin {_pair(before, after, 'rewards/margins', '.4g')}, "
            f"chosen/rejected reward {_pair(None, after, 'rewards/chosen', '.4g')}/"
            f"{_pair(None, after, 'rewards/rejected', '.4g')}, chosen/rejected log-prob "
            f"{_pair(None, after, 'logps/chosen', '.4g')}/{_pair(None, after, 'logps/rejected', '.4g')} on {where}")
    if figures.get("started_from"):
        text += f"; started from {figures['started_from']}"
    return text
