"""The run directory: its layout, written and read in one place.

    RUN/adapter_model.safetensors, adapter_config.json, README.md   standard PEFT layout
    RUN/tokenizer.json, tokenizer_config.json, chat_template.jinja  tokenizer with the run's template
    RUN/recipe.yaml      the fully resolved recipe, defaults included
    RUN/metrics.jsonl    one JSON object per logging or evaluation step (and one where a run resumed)
    RUN/README.md        model card: recipe essentials, results, how to load it with plain peft
    RUN/loss.png         train loss (raw and smoothed) and eval loss against step
    RUN/summary.json     written last: its presence means the run completed
    RUN/checkpoints/     trainer checkpoints (adapter, optimizer, scheduler, RNG state)
    RUN/.qlora-run.json  the marker: this is a run directory, and the names qlora wrote in it
    RUN/.qlora-run.lock  held (flock) by the one process writing the run

Everything a later command needs (the adapter, the tokenizer with its template, the recipe) is
here, so a run can be used given nothing but this directory's path.

Two promises rest on the marker and the lock. `--overwrite` deletes only what the marker says
qlora wrote, and only in a directory that has one: a folder that merely holds a file named
recipe.yaml is the user's, not a run. And one process writes a run at a time: the lock is an
flock, which the kernel drops when its holder dies, so a run killed with SIGKILL leaves nothing
stale and `--resume` takes the lock again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.util.files import write_atomically, write_json_atomically

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LOSS_PLOT = "loss.png"
MODEL_CARD = "README.md"
MARKER = ".qlora-run.json"
LOCK = ".qlora-run.lock"
FINAL_STAGING = ".final.partial"
# The names `qlora train` writes at the top of a run directory besides the adapter and tokenizer
# files (those are recorded as they are saved: their names depend on PEFT and the tokenizer).
TRAIN_WRITES = (MARKER, LOCK, RECIPE, METRICS, SUMMARY, CHECKPOINTS, LOSS_PLOT, MODEL_CARD, FINAL_STAGING)
# Set for the processes of a run by the one that holds its lock (`qlora train --nproc` launches
# its workers with it), so they do not take the lock as someone else's.
LOCK_ENV = "QLORA_RUN_LOCK"
# What `qlora merge` writes beside the merged weights (RUN/merged/ by default): what was merged, and
# how faithfully. Its presence marks a directory as a merge output.
MERGE_REPORT = "merge_report.json"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def check_available(self, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
        """Refuse an output directory that would clobber something, before any work is done.

        A non-empty directory is refused unless --overwrite; and --overwrite only ever replaces an
        earlier run directory that qlora wrote (it has the marker), and only when everything in it
        is something qlora wrote there. It never touches the model, the data, the recipe or the
        working directory, so a mistyped path cannot delete your inputs.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError.single("output.dir", f"{path} exists and is a file: choose another output.dir")
        # The directory itself when it exists (it may sit on a read-only filesystem), else the
        # nearest parent that exists, which the directory would be created in.
        nearest = next((p for p in (path.absolute(), *path.absolute().parents) if p.exists()), None)
        if nearest is not None and not nearest.is_dir():
            raise UserError.single("output.dir", f"{path} cannot be created: {nearest} is a file, not a directory")
        if nearest is not None and not os.access(nearest, os.W_OK):
            what = "is not writable" if nearest == path.absolute() else f"cannot be created: {nearest} is not writable"
            raise UserError.single("output.dir", f"{path} {what} (a read-only filesystem, or no permission): "
                                   "choose another output.dir")
        if holder := self.lock_holder():
            raise UserError.single("output.dir", f"{path} is being written by another qlora process ({holder}): "
                                   "wait for it to finish, or choose another output.dir")
        entries = self.entries()
        if not entries:
            return
        if not overwrite:
            raise UserError.single(
                "output.dir",
                f"{path} already exists and is not empty: choose another output.dir (or --output-dir), "
                "or pass --overwrite to replace an earlier run",
            )
        written = self.written_by_qlora()
        if written is None:
            raise UserError.single(
                "output.dir", f"--overwrite only replaces an earlier run directory written by qlora (with its "
                f"{MARKER} marker), and {path} has none: it was not made by `qlora train` (or by a version "
                "before the marker). Move or delete it yourself, or choose another output.dir",
            )
        foreign = sorted(name for name in entries if not _is_ours(name, written))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError.single(
                "output.dir", f"--overwrite only deletes what qlora wrote, and {path} also holds {shown}, which "
                "qlora did not write: move them out of it, or choose another output.dir",
            )
        here = path.resolve()
        for inside in (Path.cwd(), *protected):
            inside = Path(inside).resolve()
            if inside == here or here in inside.parents:
                raise UserError.single("output.dir", f"--overwrite would delete {inside}, which this run needs")

    def entries(self) -> list[str]:
        """The names in the directory, less the lock (present while a run is being set up)."""
        if not self.path.is_dir():
            return []
        return [p.name for p in self.path.iterdir() if p.name != LOCK]

    # --- The marker: what qlora wrote here -------------------------------------------------------

    def written_by_qlora(self) -> set[str] | None:
        """The names the marker records, or None when there is no readable marker."""
        try:
            marker = json.loads((self.path / MARKER).read_text(encoding="utf-8"))
            return {str(name) for name in marker["wrote"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record(self, *names: str) -> None:
        """Add NAMES (entries of this directory) to the marker, replacing it atomically.
        Does nothing in a directory without a marker: only `qlora train` starts one."""
        written = self.written_by_qlora()
        if written is None or written.issuperset(names):
            return
        self._write_marker(written | set(names))

    def _write_marker(self, names: set[str]) -> None:
        from qlora_cli import __version__

        write_json_atomically(self.path / MARKER, {"tool": "qlora", "version": __version__, "wrote": sorted(names)},
                              indent=1)

    # --- The lock: one writer per run --------------------------------------------------------------

    def lock_holder(self) -> str | None:
        """Who holds this run's lock ("pid 123 on host, since 12:01:02"), or None when nobody does.

        Processes of the run that holds it (LOCK_ENV) and non-zero ranks of a launch (rank 0 holds
        it for them) do not count it as someone else's."""
        from qlora_cli.train.distributed import is_main_process

        if fcntl is None or not is_main_process() or os.environ.get(LOCK_ENV) == str(self.path.resolve()):
            return None
        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return None  # no lock file: nobody has ever locked this directory
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a shared lock fails while a writer holds it
        except OSError:
            return _describe_holder(fd)
        finally:
            os.close(fd)
        return None

    def lock(self) -> "RunLock":
        return RunLock(self)

    def create(self, overwrite: bool) -> None:
        """Make the run directory (replacing what an earlier run wrote, with overwrite) and mark it."""
        written = self.written_by_qlora() if overwrite else None
        # check_available has refused a directory holding anything else, so this deletes what
        # qlora wrote, nothing more.
        for name in self.entries() if written is not None else ():
            target = self.path / name
            if name == MARKER or not _is_ours(name, written):
                continue  # the marker is rewritten below
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_marker(set(TRAIN_WRITES))

    def write_recipe(self, recipe) -> None:
        (self.path / RECIPE).write_text(recipe.to_yaml(), encoding="utf-8")

    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # the last line of a run killed mid-write
                continue
        return records

    def prepare_resume(self, step: int) -> None:
        """Before continuing from checkpoint-STEP: forget what the interrupted run logged after it
        (the resumed run logs those steps again), and mark the run unfinished until it is."""
        from qlora_cli.train.checkpoints import remove_staging

        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        write_atomically(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in kept))
        (self.path / SUMMARY).unlink(missing_ok=True)
        remove_staging(self.checkpoints)

    @property
    def final_staging(self) -> Path:
        """Where save_final writes before renaming into place (a fixed path every rank can name)."""
        return self.path / FINAL_STAGING

    def save_final(self, save_adapter, tokenizer, model=None) -> None:
        """The adapter (`save_adapter(directory)`, e.g. a PeftModel's save_pretrained) and tokenizer,
        saved beside the run directory's files and then renamed in one file at a time, so no file
        in the run directory is ever half written. With the trained `model`, also what serving
        tools read: its generation_config.json with the run's stop token, and the base's path
        made absolute in adapter_config.json (serving.py)."""
        from qlora_cli.outputs.served_files import (
            keep_base_tokenizer_files,
            make_base_path_absolute,
            save_tokenizer,
            write_generation_config,
        )

        staging = self.final_staging
        shutil.rmtree(staging, ignore_errors=True)
        try:
            save_adapter(staging)
            save_tokenizer(tokenizer, staging)  # its chat template in plain Jinja (serving.portable_jinja)
            keep_base_tokenizer_files(staging, tokenizer.name_or_path)
            if model is not None:
                make_base_path_absolute(staging)
                write_generation_config(staging, model.generation_config, model.config, tokenizer)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # e.g. a full disk: free what was written
            raise
        names = [path.name for path in staging.iterdir()]
        self.record(*names)  # before they appear: a later --overwrite may then delete them
        for name in names:
            os.replace(staging / name, self.path / name)
        staging.rmdir()

    def write_summary(self, summary: dict) -> None:
        """Write summary.json last, via a temporary name, so a partial file never looks like a finished run."""
        write_json_atomically(self.path / SUMMARY, summary)


def _is_ours(name: str, written: set[str]) -> bool:
    """NAME is something qlora wrote: a recorded name, or the temporary file or folder it writes
    first and renames into place (`.README.md.partial`, `.merged.partial-123`, `summary.json.tmp`)."""
    return name in written or any(name.startswith(f".{w}.partial") or name == f"{w}.tmp" for w in written)


def _describe_holder(fd: int) -> str:
    """What the holder wrote into the lock file when it took it."""
    try:
        info = json.loads(os.read(fd, 4096).decode("utf-8"))
        return f"pid {info['pid']} on {info['host']}, since {info['since']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file gives no details"


class RunLock:
    """The run directory's write lock, held from before the checks until the run ends.

        with RunDir(path).lock():   # UserError when another process holds it
            ...                     # create, train, save

    Taking it creates the directory when it does not exist yet; if the run then fails before
    writing anything else, the directory is removed again, so a refused recipe leaves nothing.
    The lock file itself stays (deleting a lock file others may have open breaks flock's
    guarantee); it is one of the names the marker records.
    """

    def __init__(self, run: RunDir):
        self.run = run
        self._fd: int | None = None
        self._created = False
        self._env_before: str | None = None

    def __enter__(self) -> "RunLock":
        from qlora_cli.train.distributed import is_main_process

        path = self.run.path
        key = str(path.resolve())
        # Non-zero ranks write no run files (rank 0 does, holding the lock for all); a process
        # launched by a holder (LOCK_ENV) is covered by its lock.
        if fcntl is None or not is_main_process() or os.environ.get(LOCK_ENV) == key:
            return self
        if path.exists() and not path.is_dir():
            raise UserError.single("output.dir", f"{path} exists and is a file: choose another output.dir")
        try:
            self._created = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._remove_if_empty()
            raise UserError.single("output.dir", f"cannot write to {path}: {exc.strerror} (a read-only filesystem, "
                                   "or no permission): choose another output.dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise UserError.single("output.dir", f"{path} is being written by another qlora process ({holder}): "
                                   "wait for it to finish, or choose another output.dir") from None
        # Who holds it, for the message the next process gets.
        command = " ".join(["qlora", *sys.argv[1:]]) if sys.argv else "qlora"
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}).encode())
        self._fd = fd
        self._env_before = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = key  # inherited by the processes this one launches
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        if self._env_before is None:
            os.environ.pop(LOCK_ENV, None)
        else:
            os.environ[LOCK_ENV] = self._env_before
        self._remove_if_empty()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _remove_if_empty(self) -> None:
        """A directory this lock created, that holds nothing but the lock file: the run never
        started, so leave nothing behind."""
        if not self._created or self.run.entries():
            return
        try:
            (self.run.path / LOCK).unlink(missing_ok=True)
            self.run.path.rmdir()
        except OSError:
            pass


def run_segments(records: list[dict], last_step: int, seconds_now: float) -> list[dict]:
    """[{"from_step", "to_step", "seconds"}] for each stretch of training between resumes, from
    metrics.jsonl's resume marks; SECONDS_NOW is the time of this call's segment, ending at LAST_STEP.
    An earlier segment's time runs to its last log before the checkpoint the next one resumed from."""
    marks = [r for r in records if r.get("resumed")]
    segments, start, before = [], 0, 0.0
    for mark in marks:
        segments.append({"from_step": start, "to_step": mark["step"], "seconds": round(mark["elapsed_s"] - before, 2)})
        start, before = mark["step"], mark["elapsed_s"]
    segments.append({"from_step": start, "to_step": last_step, "seconds": round(seconds_now, 2)})
    return segments


def segments_text(summary: dict) -> str:
    """' (2 segments: 140.2s to step 24, 266.9s from step 24)' for a resumed run; '' otherwise."""
    parts = summary.get("segments") or []
    if len(parts) < 2:
        return ""
    return f" ({len(parts)} segments: " + ", ".join(
        f"{p['seconds']:.1f}s " + (f"to step {p['to_step']}" if i == 0 else f"from step {p['from_step']}")
        for i, p in enumerate(parts)) + ")"
