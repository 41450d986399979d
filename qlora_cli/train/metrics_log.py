"""RUN/metrics.jsonl as the run goes: one JSON object per logging or evaluation step, with
throughput. A transformers callback, so the loop stays TRL's; it writes on the main process only.
(Reading the file back is RunDir.read_metrics, in outputs/run_dir.py.)"""

from __future__ import annotations

import time

from transformers import TrainerCallback

# The trainer's final aggregate log carries "train_loss" (step logs carry "loss"); it belongs in
# summary.json, not in the step log.
END_OF_TRAINING_KEYS = {"train_loss"}


class MetricsLog(TrainerCallback):
    """Append one JSON object per logging/evaluation step to RUN/metrics.jsonl, with throughput.

    `elapsed_s` counts the run's whole training time: a resumed run continues from the time logged
    before its checkpoint, and marks where it resumed with {"step": N, "resumed": true, "elapsed_s"}
    (outputs/run_dir.py's run_segments reads the segments back)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self._t0 = None
        self._last = (None, 0)  # (time, tokens) at the previous train log

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()
        self._last = (self._t0, state.num_input_tokens_seen)
        if state.global_step > 0 and state.is_world_process_zero:  # resumed: prepare_resume kept the log up to here
            offset = max((r.get("elapsed_s", 0.0) for r in self.run_dir.read_metrics()), default=0.0)
            self._t0 -= offset
            self.run_dir.append_metrics({"step": state.global_step, "resumed": True, "elapsed_s": round(offset, 3)})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or END_OF_TRAINING_KEYS & logs.keys():
            return
        now = time.perf_counter()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        record.update({k: v for k, v in logs.items() if k != "epoch"})
        if "loss" in logs:
            then, tokens = self._last
            seen = state.num_input_tokens_seen
            if now > then:
                record["tokens_per_second"] = round((seen - tokens) / (now - then), 1)
            self._last = (now, seen)
        record["elapsed_s"] = round(now - self._t0, 3)
        self.run_dir.append_metrics(record)


