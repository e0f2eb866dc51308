"""Checksummed, atomic checkpoint files, safe loading, and keep-the-previous-good rotation.

A checked file is one self-contained blob, so a single ``os.replace`` publishes it atomically:

    offset  size  content
    0       16    magic  b"METARAY-CKPT\\x00v1\\n"
    16      1     kind   b"T" (a torch.save payload) or b"B" (raw bytes)
    17      8     payload length, unsigned little-endian
    25      32    SHA-256 of the payload
    57      n     payload

Reading checks magic, length (a truncated file is short), digest (a flipped byte changes it), and only then
deserializes, always with ``torch.load(weights_only=True)``: only tensors and plain Python containers come
back; a pickle that names any other global (``os.system``, ``pathlib.Path.touch``, ...) is refused before it
runs. The checksum detects accidents (truncation, bit rot, a half-copied file); it is not a signature, so
protection against a hostile file comes from ``weights_only``, which holds whatever the checksum says.

Rotation (``save_rotating``): the new checkpoint is written to a temporary name, fsynced, renamed, read back and
verified; only then does ``latest.json`` point at it and are older ones pruned, keeping ``keep`` verified files.
``load_latest_good`` walks from the newest file back and returns the first one that verifies, saying which
newer ones it skipped and why.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

MAGIC = b"METARAY-CKPT\x00v1\n"
HEADER = struct.Struct("<1sQ32s")  # kind, payload length, sha256
HEADER_SIZE = len(MAGIC) + HEADER.size
KIND_TORCH, KIND_BYTES = b"T", b"B"
LATEST = "latest.json"
_NAME = re.compile(r"^(?P<prefix>[A-Za-z0-9_\-]+)_(?P<step>\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, altered, or holds something other than tensors and plain
    data. The message names the file and what is wrong with it."""


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------


def dumps_checked(obj: bytes | Any) -> bytes:
    """The checked-file bytes of ``obj``: raw ``bytes`` as they are, anything else through ``torch.save``
    (tensors, dicts, lists, numbers, strings: what ``weights_only`` loading accepts)."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        kind, payload = KIND_BYTES, bytes(obj)
    else:
        buf = io.BytesIO()
        torch.save(obj, buf)
        kind, payload = KIND_TORCH, buf.getvalue()
    return MAGIC + HEADER.pack(kind, len(payload), hashlib.sha256(payload).digest()) + payload


def loads_checked(data: bytes, where: str = "<bytes>") -> Any:
    """Verifies and decodes ``dumps_checked`` output; raises CheckpointError naming ``where`` otherwise."""
    if len(data) < HEADER_SIZE or not data.startswith(MAGIC):
        if data[: len(MAGIC)] == MAGIC[: len(data)] and data:
            raise CheckpointError(f"{where}: truncated checkpoint: {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
        raise CheckpointError(
            f"{where}: not a checksummed metaray checkpoint (no {MAGIC[:12].decode()} header); refusing to load it. "
            "Checkpoints written before checksums were added, or files from elsewhere, are not trusted"
        )
    kind, length, digest = HEADER.unpack_from(data, len(MAGIC))
    payload = data[HEADER_SIZE:]
    if kind not in (KIND_TORCH, KIND_BYTES):
        raise CheckpointError(f"{where}: corrupt checkpoint header (unknown payload kind {kind!r})")
    if len(payload) != length:
        what = "truncated" if len(payload) < length else "has trailing bytes"
        raise CheckpointError(
            f"{where}: checkpoint {what}: header says {length} payload bytes, file holds {len(payload)}; "
            "it was cut off or altered (use an older checkpoint)"
        )
    actual = hashlib.sha256(payload).digest()
    if actual != digest:
        raise CheckpointError(
            f"{where}: checkpoint checksum mismatch (SHA-256 {actual.hex()[:16]}..., header says {digest.hex()[:16]}...): "
            "the file was altered or corrupted after it was written (use an older checkpoint)"
        )
    if kind == KIND_BYTES:
        return payload
    return safe_torch_load(payload, where)


def safe_torch_load(source: bytes | str | os.PathLike, where: str | None = None) -> Any:
    """``torch.load(weights_only=True, map_location="cpu")`` of a path or bytes, with refusals as CheckpointError.

    weights_only unpickling allows tensors and plain containers only; any other global in the pickle (a class,
    a function such as ``os.system``) is refused before anything is called."""
    where = where or str(source if not isinstance(source, bytes) else "<bytes>")
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: checkpoint file does not exist") from None
    except Exception as e:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, EOFError, ... )
        text = str(e)
        m = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand[^\n.]*)", text)
        reason = m.group(1) if m else text.strip().split("\n")[0][:200]
        if m or "Weights only load failed" in text:
            raise CheckpointError(
                f"{where}: refused: the checkpoint holds objects other than tensors and plain data "
                f"({reason}); metaray never unpickles arbitrary objects"
            ) from None
        raise CheckpointError(f"{where}: unreadable checkpoint payload ({type(e).__name__}: {reason})") from None


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to a temporary file next to ``path``, fsyncs it, renames it over ``path`` and fsyncs the
    directory: a crash at any instant leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_atomic_checked(path: str | os.PathLike, obj: bytes | Any) -> Path:
    """Atomically writes ``obj`` (bytes, or tensors / plain data via torch.save) with its SHA-256 header."""
    return write_atomic(path, dumps_checked(obj))


def read_checked(path: str | os.PathLike) -> Any:
    """Reads a file written by ``write_atomic_checked``: verified, then loaded with ``weights_only=True``.
    Raises CheckpointError (naming the file) if it is missing, truncated, altered or holds arbitrary objects."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint ({e})") from None
    return loads_checked(data, str(path))


def verify(path: str | os.PathLike) -> str | None:
    """None if the file is a valid checked checkpoint, else the reason it is not."""
    try:
        read_checked(path)
    except CheckpointError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------------------------------------
# Rotation
# ----------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int, prefix: str = "ckpt") -> str:
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", prefix):
        raise ValueError(f"checkpoint prefix must match [A-Za-z0-9_-]+, got {prefix!r}")
    return f"{prefix}_{step:07d}.pt"


def list_checkpoints(directory: str | os.PathLike, prefix: str = "ckpt") -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (by step)."""
    directory = Path(directory)
    found = []
    for p in directory.glob(f"{prefix}_*.pt") if directory.is_dir() else []:
        m = _NAME.match(p.name)
        if m and m["prefix"] == prefix:
            found.append((int(m["step"]), p))
    return [p for _, p in sorted(found)]


def save_rotating(directory: str | os.PathLike, step: int, obj: Any, *, keep: int = 2, prefix: str = "ckpt") -> Path:
    """Writes ``<prefix>_<step>.pt`` atomically with its checksum, reads it back to verify it, then points
    ``latest.json`` at it and deletes older checkpoints beyond the ``keep`` newest valid ones. If the new file
    does not verify, it is removed, the previous checkpoints stay, and CheckpointError is raised."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (the previous good checkpoint is never deleted first), got {keep!r}")
    directory = Path(directory)
    path = directory / checkpoint_name(step, prefix)
    write_atomic_checked(path, obj)
    problem = verify(path)
    if problem is not None:
        path.unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint did not verify after writing, previous checkpoints kept: {problem}")
    write_atomic(directory / LATEST, json.dumps({"step": step, "file": path.name}).encode())
    valid = 0
    for old in reversed(list_checkpoints(directory, prefix)):
        if valid < keep and (old == path or verify(old) is None):
            valid += 1
            continue
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_latest_good(directory: str | os.PathLike, prefix: str = "ckpt") -> tuple[Path, Any]:
    """(path, contents) of the newest checkpoint in ``directory`` that verifies. Newer files that do not verify
    are skipped with a RuntimeWarning naming them and why. Raises CheckpointError if none verifies."""
    directory = Path(directory)
    candidates = list(reversed(list_checkpoints(directory, prefix)))
    pointer = directory / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["file"]
        except (ValueError, KeyError, TypeError):
            name = None
        # latest.json only orders the search; a name in it that escapes the directory is ignored
        if isinstance(name, str) and _NAME.match(name) and (directory / name) in candidates:
            candidates.remove(directory / name)
            candidates.insert(0, directory / name)
    skipped = []
    for p in candidates:
        try:
            obj = read_checked(p)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if skipped:
            warnings.warn("skipped bad checkpoint(s): " + " | ".join(skipped) + f"; resuming from {p.name}",
                          RuntimeWarning, stacklevel=2)
        return p, obj
    if not candidates:
        raise CheckpointError(f"{directory}: no checkpoints ({prefix}_<step>.pt) found")
    raise CheckpointError(f"{directory}: no checkpoint verifies: " + " | ".join(skipped))
