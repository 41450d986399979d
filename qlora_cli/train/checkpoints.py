"""Checkpoints that are either whole or absent, and finding the one to resume from.

    RUN/checkpoints/checkpoint-200/   adapter, optimizer, scheduler, RNG states, trainer_state.json
                                      (the step, hence the data position), qlora_log_window.json
                                      (the loss summed since the last log: trainer.py) and
                                      qlora_manifest.json

transformers writes a checkpoint file by file. `CheckpointingTrainer` (trainer.py) has it write
into a staging directory instead; the manifest (every file's size and SHA-256) is written last,
and then the directory is renamed into place. So a checkpoint without a manifest was never
finished, and one whose files no longer match their manifest was damaged afterwards (a full
disk, a truncated copy): `find_resume_point` skips both, with a warning, and falls back to the
previous one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from qlora_cli.errors import UserError
from qlora_cli.util.files import sha256_file, write_json_atomically

MANIFEST = "qlora_manifest.json"
STAGING = ".staging"  # checkpoints are written here, then renamed into place
STATE = "trainer_state.json"
# Written into the staging directory before the manifest, so the manifest lists and hashes it like
# every other file. Not required by `problem`: a checkpoint from before it existed still resumes
# (its first log after the resume then averages fewer steps).
LOG_WINDOW = "qlora_log_window.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def write_manifest(checkpoint: Path) -> None:
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        files[str(path.relative_to(checkpoint))] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    write_json_atomically(checkpoint / MANIFEST, {"files": files}, indent=1)


def problem(checkpoint: Path, hashes: bool = True) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it is whole. Without `hashes`, only
    presence and sizes are checked: enough to tell finished from unfinished while rotating,
    without re-hashing gigabytes of optimizer state at every save."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return "it was never finished (no manifest)"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, OSError):
        return f"its {MANIFEST} is unreadable"
    if STATE not in files:
        return f"it has no {STATE}"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size:,} bytes, not {expected['bytes']:,} (truncated?)"
        if hashes and sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def step_of(checkpoint: Path) -> int:
    match = _NAME.match(checkpoint.name)
    return int(match.group(1)) if match else -1


def checkpoints_in(root: Path) -> list[Path]:
    """checkpoint-N directories under root, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=step_of, reverse=True)


def find_resume_point(root: Path, explicit: Path | None = None, warn=print, hashes: bool = True) -> Path:
    """The checkpoint to resume from: `explicit` if given and whole, else the newest whole one under
    root. Damaged ones are skipped with a warning; none at all is a UserError (exit 2).
    hashes=False checks that the files are there without reading them (a quick first look)."""
    if explicit is not None:
        reason = problem(explicit, hashes=hashes)
        if reason is None:
            return explicit
        candidates = [p for p in checkpoints_in(explicit.parent) if step_of(p) < step_of(explicit)]
        warn(f"cannot resume from {explicit}: {reason}")
    else:
        candidates = checkpoints_in(root)
    skipped = []
    for checkpoint in candidates:
        reason = problem(checkpoint, hashes=hashes)
        if reason is None:
            if skipped or explicit is not None:
                warn(f"resuming from the previous whole checkpoint, {checkpoint}")
            return checkpoint
        warn(f"skipping {checkpoint}: {reason}")
        skipped.append(checkpoint)
    where = explicit if explicit is not None else root
    raise UserError.single(
        "--resume",
        f"no whole checkpoint to resume from in {where}"
        + (f" ({len(skipped)} damaged)" if skipped else "")
        + ": train again without --resume (add --overwrite to replace the run directory)",
    )


def rotate(root: Path, keep: int) -> None:
    """Keep the newest `keep` whole checkpoints; delete older ones, and unfinished ones older than
    the newest whole one. Runs only after a new checkpoint is whole, so a crash during rotation
    can never leave zero checkpoints."""
    whole = 0
    for checkpoint in checkpoints_in(root):
        if problem(checkpoint, hashes=False) is None and whole < keep:
            whole += 1
            continue
        if whole > 0:
            shutil.rmtree(checkpoint, ignore_errors=True)


def write_log_window(checkpoint: Path, window: dict) -> None:
    (checkpoint / LOG_WINDOW).write_text(json.dumps(window, indent=1) + "\n", encoding="utf-8")


def read_log_window(checkpoint: Path) -> dict | None:
    """The log window saved with this checkpoint, or None for a checkpoint written without one."""
    path = checkpoint / LOG_WINDOW
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def remove_staging(root: Path) -> None:
    """Remove what a killed or failed save left in the staging directory (never a checkpoint)."""
    shutil.rmtree(root / STAGING, ignore_errors=True)


def publish(staged: Path, root: Path) -> Path:
    """Manifest, then one rename into place: the checkpoint appears whole or not at all."""
    write_manifest(staged)
    final = root / staged.name
    if final.exists():  # a leftover from a run that died after this step was saved once before
        shutil.rmtree(final)
    root.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    try:
        staged.parent.rmdir()  # the staging directory, now empty
    except OSError:
        pass
    return final


class WriteFailed(OSError):
    """A failed write that a library reported as something other than an OSError (write_failure)."""


# torch.save's C++ zip writer does not raise OSError when a write fails: it raises RuntimeError,
# "[enforce fail at inline_container.cc:672] . unexpected pos 674048 vs 673936" (a write came up
# short: seen on a full tmpfs), "... PytorchStreamWriter failed writing file data/0: file write
# failed" or "basic_ios::clear: iostream error" (the output stream's failbit). None of these can
# come from anything but writing the file.
_TORCH_WRITE_FAILED = re.compile(
    r"inline_container\.cc.*unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing|basic_ios::clear"
)
# safetensors raises SafetensorError and names the OS error: "Error while serializing: I/O error:
# No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"I/O error: .*\(os error (\d+)\)")
# Below this much free space after a write failed, the disk is full: the failed write itself used
# up what was left (a write larger than the free space fills the disk before it fails).
LOW_SPACE_BYTES = 64 * 2**20


def write_failure(exc: BaseException, target: Path) -> WriteFailed | None:
    """The OSError behind `exc` if it is a failed write under `target` in disguise, else None (a
    bug, to surface as one). Call it before removing what the failed write left: the free space on
    target's filesystem is how a full disk is told apart from other write failures."""
    if isinstance(exc, OSError):
        return None  # already says what it is
    text = str(exc)
    if match := _RUST_OS_ERROR.search(text):
        code = int(match.group(1))
        return WriteFailed(code, os.strerror(code), str(target))
    if not (isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILED.search(text)):
        return None
    free = _free_bytes(target)
    if free is not None and free < LOW_SPACE_BYTES:
        return WriteFailed(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    space = f"{free / 2**30:.1f} GiB free" if free is not None else "free space unknown"
    return WriteFailed(errno.EIO, f"PyTorch could not write the file ({text.strip()}; {space}: is the disk over "
                                  "quota, or failing?)", str(target))


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):  # the nearest directory that exists
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


