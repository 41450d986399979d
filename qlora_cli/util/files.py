"""Writing files so that nothing on disk is ever half-written, and hashing them.

    write_atomically(path, text)                     # or a callable that writes to the path it is given
    write_json_atomically(path, obj, indent=2)
    sha256_file(path)
    check_output_path(path, overwrite)              # a command's --output, checked before any work
    swap_directory_into_place(tmp_dir, out, overwrite, "merging")   # a finished output folder, renamed in

A file is written under a hidden temporary name beside its target (same directory, so the same
file system) and renamed over it: a reader, a crash or a Ctrl-C sees the old file or the new one,
never a mixture. The temporary is removed when writing fails (a full disk, an interrupt).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from qlora_cli.errors import UserError


def check_output_path(path: Path, overwrite: bool, kind: str = ".jsonl") -> None:
    """Before any work (a model load, a plot): the file can be written, and an existing one is
    replaced only when asked. Raises UserError naming --output."""
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError.single("--output", f"{parent} is not a directory")
    if path.is_dir():
        raise UserError.single("--output", f"{path} is a directory: give a {kind} file path")
    if path.exists() and not overwrite:
        raise UserError.single("--output", f"{path} exists: pass --overwrite to replace it, or give another path")


def write_atomically(path: str | Path, content: str | Callable[[Path], None]) -> None:
    """Replace PATH in one rename. CONTENT is the text (UTF-8), or a function that writes the file
    at the temporary path it is given (for writers that want a path: matplotlib, JSONL streams)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, obj, indent: int | None = 2, ensure_ascii: bool = True) -> None:
    write_atomically(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii) + "\n")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def swap_directory_into_place(tmp: Path, out: Path, overwrite: bool, doing: str) -> None:
    """Rename a finished output directory (built at TMP, beside OUT) to its name.

    Without overwrite a plain rename, which fails rather than replace a directory that appeared
    meanwhile. With it, the earlier output is moved aside, the new one renamed in, and only then
    the old one deleted; if the second rename fails, the old output is put back. DOING names the
    command's work for the message ("merging", "exporting").
    """
    if not overwrite or not out.exists():
        try:
            tmp.rename(out)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise UserError.single("--output", f"{out} appeared while {doing}; it was left alone: run again") from None
            raise
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
