"""Checkpoint files: a safe format that ``torch.load(..., weights_only=True)`` reads, written atomically.

A checkpoint is one dict of plain data (tensors, numbers, strings, booleans, None, lists, tuples
and dicts), so loading it never runs code from the file. Its keys:

- ``format``: ``"crsam-checkpoint"``; ``format_version``: ``FORMAT_VERSION``;
  ``crsam_version``: the version that wrote it.
- ``epoch``: the number of completed epochs.
- ``config``: every resolved training option (the same dict as ``config.json``).
- ``data``: the data set's name, sizes, SHA-256 hash and generation arguments.
- ``model``: the model's ``state_dict``.
- ``prior``: the prior centre: ``kind`` (``"init"``: the seeded initial weights), ``state``
  (a ``state_dict``), ``seed``, and ``split`` (None, or the sizes and index hash of the training
  examples held out for a data-dependent prior).
- ``optimizer`` and ``scheduler``: their ``state_dict``s.
- ``metrics``: the list of per-epoch metric dicts so far.
- ``rng``: ``torch`` (the global CPU generator state) and ``data_order`` (the state of the
  generator that shuffles the training set), both uint8 tensors.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from crsam import __version__
from crsam.errors import UsageError

FORMAT_NAME = "crsam-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format",
    "format_version",
    "crsam_version",
    "epoch",
    "config",
    "data",
    "model",
    "prior",
    "optimizer",
    "scheduler",
    "metrics",
    "rng",
)

# Types that torch.load(weights_only=True) accepts without an allow-list.
_PLAIN_TYPES = (bool, int, float, str, type(None), torch.Tensor, torch.Size)


def find_unsafe_value(value: Any, where: str = "checkpoint") -> str | None:
    """Return the key path of the first value a weights-only load would reject, or None.

    Checking before writing turns a checkpoint that could never be loaded safely into an
    immediate error at save time, not a failure when someone later tries to read it.
    """
    if isinstance(value, _PLAIN_TYPES):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return f"{where} key {key!r}"
            found = find_unsafe_value(item, f"{where}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = find_unsafe_value(item, f"{where}[{index}]")
            if found is not None:
                return found
        return None
    return f"{where} ({type(value).__name__})"


def save_checkpoint(payload: dict, path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` atomically, so readers see the old file or the new one whole.

    The data go to a temporary file in the same folder, which is flushed and fsynced, then renamed
    over ``path`` with ``os.replace`` (atomic on POSIX and Windows within one file system). On any
    failure the temporary file is removed and ``path`` keeps its previous content.
    """
    unsafe = find_unsafe_value(payload)
    if unsafe is not None:
        raise TypeError(
            f"{unsafe} is not plain data; store tensors, numbers, strings, booleans, None, "
            "lists, tuples or dicts so that torch.load(weights_only=True) can read the checkpoint"
        )

    path = Path(path)
    folder = path.parent
    descriptor, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        # Covers KeyboardInterrupt too: a half-written temporary file must not stay behind.
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(folder)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``, like ``save_checkpoint``."""
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush the folder entry of a rename to disk where the platform allows opening folders."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        # Some file systems (and Windows) do not support fsync on a folder; the rename still happened.
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a crsam checkpoint with ``weights_only=True`` and check its format.

    Raises UsageError, with a one-line message naming ``path`` and the fix, when the file is
    missing, is a folder, is truncated or corrupt, contains objects other than plain data (a
    weights-only load rejects pickled classes and functions, so no code from the file runs), or is
    not a crsam checkpoint of a known format version.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(
            f"checkpoint {str(path)!r} not found; pass the checkpoint.pt that 'crsam train --out DIR' wrote"
        )
    if path.is_dir():
        hint = path / "checkpoint.pt"
        raise UsageError(f"checkpoint {str(path)!r} is a folder; pass a file such as {str(hint)!r}")

    if path.stat().st_size == 0:
        raise UsageError(f"checkpoint {str(path)!r} is empty; train again or restore an intact copy")

    try:
        with warnings.catch_warnings():
            # A foreign pickle draws a multi-line protocol warning before the error reported below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler raises this both for rejected globals (classes, functions)
        # and for bytes that are no pickle at all. Its detail line distinguishes the two cases.
        detail = _weights_only_detail(error)
        if detail.startswith("Unsupported global"):
            raise UsageError(
                f"checkpoint {str(path)!r} was rejected: it contains objects other than tensors and plain "
                f"data ({detail}); load only checkpoints written by 'crsam train'"
            ) from None
        raise UsageError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({detail}); train again or restore an intact copy"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise UsageError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({_first_line(error)}); "
            "train again or restore an intact copy"
        ) from None

    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise UsageError(
            f"{str(path)!r} is not a crsam checkpoint (no format {FORMAT_NAME!r} entry); "
            "pass the checkpoint.pt that 'crsam train --out DIR' wrote"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UsageError(
            f"checkpoint {str(path)!r} lacks {', '.join(missing)}; it is incomplete, so train again"
        )
    version = payload["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UsageError(
            f"checkpoint {str(path)!r} has format version {version!r}, newer than this crsam's "
            f"{FORMAT_VERSION}; upgrade crsam (this is {__version__})"
        )
    return payload


def _weights_only_detail(error: BaseException) -> str:
    """Return the reason line of a weights-only load failure, without torch's general advice.

    torch 2.6 and later put the reason after ``WeightsUnpickler error:``, for example
    ``Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default``.
    """
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker not in message:
        return _first_line(error)
    for line in message.split(marker, 1)[1].splitlines():
        line = line.strip()
        if line:
            return line.split(". Please use", 1)[0].rstrip(".")
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    """Return the first non-empty line of an exception message, so errors stay on one line."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def json_safe(value: Any) -> Any:
    """Return ``value`` with tensors and NumPy scalars as Python numbers and NaN or infinity as None.

    JSON has no NaN or Infinity, and the command line promises standard JSON, so non-finite floats
    become null. Dict keys become strings; tuples become lists.
    """
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    # NumPy scalars and 0-d arrays expose item(); anything else is shown as text.
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return json_safe(item())
        except (TypeError, ValueError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return json_safe(tolist())
    return str(value)
