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
- ``rng``: ``torch`` (the global CPU generator state), ``data_order`` (the state of the
  generator that shuffles the training set), ``augmentation`` (the generator of CIFAR's random
  crops, flips and Cutout squares) and, for runs on a GPU, ``cuda``, all uint8 tensors.
"""

from __future__ import annotations

import math
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable
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

    _write_atomic(Path(path), "wb", lambda handle: torch.save(payload, handle))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``, like ``save_checkpoint``."""
    _write_atomic(Path(path), "w", lambda handle: handle.write(text))


def _write_atomic(path: Path, mode: str, write: Callable[[Any], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync it and rename it over ``path``."""
    folder = path.parent
    descriptor, temp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        _set_file_mode(descriptor, path)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(descriptor, mode, encoding=encoding) as handle:
            write(handle)
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


def _set_file_mode(descriptor: int, path: Path) -> None:
    """Give the temporary file that will replace ``path`` the permission bits ``path`` should have.

    mkstemp creates files readable by their owner only. An existing file keeps its mode, and a
    new one gets the mode that ``open`` would give it under the process's umask. Windows has no
    ``os.fchmod`` before Python 3.13 and no such permission bits, so nothing changes there.
    """
    if not hasattr(os, "fchmod"):
        return
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        # os.umask can only be read by setting it, so set it back at once.
        umask = os.umask(0o022)
        os.umask(umask)
        mode = 0o666 & ~umask
    os.fchmod(descriptor, mode)


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
    missing, is a folder, cannot be read, or is truncated or corrupt (a zip member fails its CRC-32
    check). It is also raised when the file contains objects other than plain data, because a
    weights-only load rejects pickled classes and functions, so no code from the file runs. The
    last cases are a file that is not a crsam checkpoint of a known format version, and entries
    of the wrong type or NaN weights.
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
    _check_zip_checksums(path)

    try:
        with warnings.catch_warnings():
            # A foreign pickle draws a multi-line protocol warning before the error reported below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The weights-only unpickler raises this both for rejected globals (classes, functions)
        # and for bytes that are no pickle at all. Its detail line distinguishes the two cases.
        detail = _weights_only_detail(error)
        if _is_rejected_object(detail):
            raise UsageError(
                f"checkpoint {str(path)!r} was rejected: it contains objects other than tensors and plain "
                f"data ({detail}); load only checkpoints written by 'crsam train'"
            ) from None
        raise UsageError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({detail}); train again or restore an intact copy"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError,
            KeyError, IndexError, struct.error) as error:
        # torch's weights-only unpickler raises KeyError, IndexError or struct.error on some short
        # files that are neither zip archives nor pickles.
        detail = first_line(error)
        if isinstance(error, (KeyError, IndexError, struct.error)):
            detail = "not a zip archive or pickle"
        if "TORCH_FORCE_" in detail:
            # torch.load rejects contradictory settings of its environment variables before reading.
            raise UsageError(
                f"torch.load failed on {str(path)!r}: {detail}; unset TORCH_FORCE_WEIGHTS_ONLY_LOAD "
                "or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
            ) from None
        raise UsageError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({detail}); "
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
    if _is_integer(version) and version > FORMAT_VERSION:
        raise UsageError(
            f"checkpoint {str(path)!r} has format version {version!r}, newer than this crsam's "
            f"{FORMAT_VERSION}; upgrade crsam (this is {__version__})"
        )
    problem = find_structure_problem(payload)
    if problem is not None:
        raise UsageError(
            f"checkpoint {str(path)!r} is invalid: {problem}; "
            "pass a checkpoint that 'crsam train' wrote, or train again"
        )
    return payload


def _check_zip_checksums(path: Path) -> None:
    """Raise UsageError when a member of a zip-format checkpoint fails its CRC-32 check.

    torch.load does not verify the checksums that torch.save writes, so without this check bytes
    flipped inside a tensor load silently as other weights. Files in torch's older non-zip format
    carry no checksums and are left to torch.load.
    """
    try:
        with open(path, "rb") as handle:
            starts_as_zip = handle.read(4) == b"PK\x03\x04"
    except OSError as error:
        raise UsageError(
            f"checkpoint {str(path)!r} cannot be read ({error.strerror or first_line(error)}); "
            "check the file's permissions"
        ) from None
    try:
        if not zipfile.is_zipfile(path):
            if starts_as_zip:
                # A zip archive whose end, with its table of contents, is missing.
                raise zipfile.BadZipFile("the zip archive has no central directory; the file was cut short")
            return
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise UsageError(
            f"checkpoint {str(path)!r} is truncated or corrupt ({first_line(error)}); "
            "train again or restore an intact copy"
        ) from None
    if damaged is not None:
        raise UsageError(
            f"checkpoint {str(path)!r} is corrupt (member {damaged!r} fails its CRC-32 check); "
            "train again or restore an intact copy"
        )


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, torch.Tensor) for key, item in value.items()
    )


def _find_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """Return the name of the first floating-point tensor in ``state`` with NaN or infinity, or None."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def find_structure_problem(payload: dict) -> str | None:
    """Return what is wrong with the types of a checkpoint's entries, or None when they are sound.

    The weights-only load guarantees plain data but not its shape. This check lets the commands
    report an edited or foreign checkpoint in one line before any entry is used. The training
    options in ``config`` and their ranges are checked by ``crsam.train``.
    """
    version = payload["format_version"]
    if not _is_integer(version) or version < 1:
        return f"format_version is {version!r}, expected a whole number from 1 to {FORMAT_VERSION}"
    epoch = payload["epoch"]
    if not _is_integer(epoch) or epoch < 0:
        return f"epoch is {epoch!r}, expected a whole number >= 0"
    for key in ("config", "data", "optimizer", "scheduler"):
        if not isinstance(payload[key], dict):
            return f"{key} is a {type(payload[key]).__name__}, expected a dict"
    if not isinstance(payload["data"].get("sha256"), str):
        return "data has no SHA-256 hash string under 'sha256'"

    # Weights: tensors by name, all finite, since a run whose loss turns NaN stops before saving.
    if not _is_tensor_dict(payload["model"]) or not payload["model"]:
        return "model is not a non-empty dict of tensors by parameter name"
    prior = payload["prior"]
    if not isinstance(prior, dict) or not _is_tensor_dict(prior.get("state")):
        return "prior has no dict of tensors under 'state'"
    for key in ("model", "prior"):
        state = payload["model"] if key == "model" else prior["state"]
        name = _find_non_finite(state)
        if name is not None:
            return f"{key} tensor {name!r} contains NaN or infinity"
    split = prior.get("split")
    if split is not None:
        if not isinstance(split, dict):
            return f"prior split is a {type(split).__name__}, expected None or a dict"
        if not isinstance(split.get("fraction"), float) or not _is_integer(split.get("seed")):
            return "prior split lacks a float 'fraction' or an integer 'seed'"
        if not isinstance(split.get("indices_sha256"), str):
            return "prior split lacks its 'indices_sha256' string"

    metrics = payload["metrics"]
    if not isinstance(metrics, list) or not all(isinstance(record, dict) for record in metrics):
        return "metrics is not a list of dicts"
    if len(metrics) != epoch:
        return f"metrics has {len(metrics)} entries for {epoch} completed epochs"
    rng = payload["rng"]
    if not isinstance(rng, dict):
        return f"rng is a {type(rng).__name__}, expected a dict"
    for key in ("torch", "data_order"):
        state = rng.get(key)
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8:
            return f"rng[{key!r}] is not a uint8 tensor of a random-number generator state"
    return None


def _is_rejected_object(detail: str) -> bool:
    """Return whether a weights-only failure rejected a class or function rather than bad bytes.

    torch 2.13 words these as ``Unsupported global: GLOBAL ...``, ``Trying to load unsupported
    GLOBAL ... whose module ... is blocked``, ``Trying to call reduce for unrecognized function
    ...`` or ``... allowlisted via `add_safe_globals` ...``.
    """
    lowered = detail.lower()
    return any(marker in lowered for marker in ("global", "unrecognized function", "allowlisted", "unsupported class"))


def _weights_only_detail(error: BaseException) -> str:
    """Return the reason line of a weights-only load failure, without torch's general advice.

    torch (2.13 here) wraps the unpickler's reason in paragraphs of advice, some of which
    suggest ``weights_only=False``. The reason is the first line that is not advice, for example
    ``Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default``.
    """
    message = str(error)
    marker = "WeightsUnpickler error:"
    if marker in message:
        message = message.split(marker, 1)[1]
    advice = ("Weights only load failed", "Check the documentation of torch.load", "Please file an issue",
              "(1)", "(2)", "Re-running `torch.load`")
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith(advice):
            return line.split(". Please use", 1)[0].rstrip(".")
    return type(error).__name__


def first_line(error: BaseException) -> str:
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
