"""Atomic file writes: the one way dcdit puts a file on disk.

Every writer here writes ``.NAME.tmp-<pid>`` next to the target, flushes and fsyncs it,
renames it over the target and fsyncs the directory. A reader (or a rerun after kill -9)
therefore sees either the old file or the new one, never a torn one; a killed write leaves
only a hidden ``.*.tmp-*`` file that :func:`remove_stale_temps` deletes on the next start.

Checkpoints, extracted shards, sample grids and ``.npz`` files, reference batches and
figures all go through these functions; :func:`check_output` is the matching check, run
before any work starts, that an output path can be written at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from dcdit_cli.common.console import DcditError

TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The hidden sibling a write goes to first: ``dir/.NAME.tmp-<pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields the temporary sibling to write ``path`` into; then fsyncs it, renames it onto
    ``path`` and fsyncs the directory. On any failure the temporary file is removed."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_open(path: Path, mode: str = "wb") -> Iterator:
    """A file object writing ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
        yield f


def write_bytes(path: Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: Path, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: Path, obj, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_npy(path: Path, array) -> Path:
    with atomic_open(path, "wb") as f:
        np.save(f, array)
    return Path(path)


def write_npz(path: Path, **arrays) -> Path:
    """An ``.npz`` (uncompressed, as ``np.savez``) written atomically."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def write_png(path: Path, image) -> Path:
    """A PIL image as PNG."""
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
    return Path(path)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Tensors (moved to CPU, made contiguous) as a safetensors file."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)  # streams to disk: no second copy in memory
    return Path(path)


# ----------------------------------------------------------------------------------------
# Checksums and leftovers
# ----------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict) -> str:
    """A checksum of tensor names, dtypes, shapes and bytes (independent of file layout)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def remove_stale_temps(directory: Path) -> list[Path]:
    """Deletes what killed writes left in ``directory`` (``.*.tmp-*`` files and folders)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for stale in directory.glob(f".*{TMP_MARK}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


# ----------------------------------------------------------------------------------------
# Output paths, checked before any work starts
# ----------------------------------------------------------------------------------------


def check_output(path: Path, flag: str, suffixes: tuple[str, ...] = (), directory: bool = False) -> Path:
    """A DcditError unless ``path`` can be written: the right suffix, no regular file on the
    way (or in its place, for a directory), and a writable nearest existing ancestor."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise DcditError(f"{flag} {path}: the file name must end in {' or '.join(suffixes)}, e.g. {flag} {path.with_suffix(suffixes[0]).name}")
    if path.exists() and path.is_dir() != directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise DcditError(f"{flag} {path} is {kind}: pass {'a directory' if directory else 'a file name'} there")
    parent = path if directory else path.parent
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DcditError(f"{flag} {path}: {ancestor} is a file, not a directory: choose an output path outside it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DcditError(f"{flag} {path}: {ancestor} is not writable: choose a directory you can write to")
    return path


__all__ = [
    "atomic_open", "atomic_path", "check_output", "file_sha256", "fsync_dir", "remove_stale_temps", "temp_path", "tensors_sha256",
    "write_bytes", "write_json", "write_npy", "write_npz", "write_png", "write_safetensors", "write_text",
]
