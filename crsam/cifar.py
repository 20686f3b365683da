"""CIFAR-10 and CIFAR-100 read from a local folder, with batched augmentation as tensor operations.

The data come from the official "python version" archives of Krizhevsky (2009). Users fetch them
from https://www.cs.toronto.edu/~kriz/cifar.html, because this module has no download code. Each
archive unpacks to one folder of pickled batches:

- CIFAR-10, ``cifar-10-python.tar.gz`` -> ``cifar-10-batches-py/`` with ``data_batch_1`` ...
  ``data_batch_5`` (training), ``test_batch`` and ``batches.meta``;
- CIFAR-100, ``cifar-100-python.tar.gz`` -> ``cifar-100-python/`` with ``train``, ``test`` and
  ``meta``.

A batch is a dict with bytes keys. ``b"data"`` is a uint8 array of shape (N, 3072) whose rows hold
the red, green and blue 32x32 planes in row-major order. The class labels are a list of ints under
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100, which also has ``b"coarse_labels"``).

When the archive sits in the data folder, its MD5 is checked against the published value and the
batches are read from the archive itself, so the checked bytes are the bytes used. Without the
archive, the extracted files are checked for shapes, dtypes, label ranges and sample counts.

Pickle can run arbitrary code while loading, so the batches are read with an unpickler that
resolves only the three numpy globals an array needs and rejects every other global.

References:
    Krizhevsky, A. (2009). Learning Multiple Layers of Features from Tiny Images. Technical report,
    University of Toronto.
    DeVries, T., & Taylor, G. W. (2017). Improved Regularization of Convolutional Neural Networks
    with Cutout. arXiv:1708.04552.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from crsam.data import hash_tensors
from crsam.errors import UsageError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"

# Every CIFAR image is 3 channels of 32x32 pixels, stored as 3072 bytes per row of b"data".
IMAGE_SHAPE = (3, 32, 32)
ROW_LENGTH = 3 * 32 * 32

# Official split sizes of both data sets.
OFFICIAL_SIZES = (50000, 10000)


@dataclass(frozen=True)
class CifarSpec:
    """Layout of one official CIFAR "python version" archive and of the folder it unpacks to."""

    name: str
    title: str
    folder: str
    archive: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    class_names_key: bytes
    num_classes: int

    @property
    def all_files(self) -> tuple[str, ...]:
        """Every file the unpacked folder must contain, in reading order."""
        return (*self.train_files, *self.test_files, self.meta_file)


# The MD5 digests are those published for the archives on the CIFAR page (URL above).
CIFAR_SPECS = {
    "cifar10": CifarSpec(
        name="cifar10",
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key=b"labels",
        class_names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key=b"fine_labels",
        class_names_key=b"fine_label_names",
        num_classes=100,
    ),
}


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------

class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global or an array that the official CIFAR files never contain."""


# numpy's array-rebuilding function, whatever module numpy files it under in this version.
_NUMPY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]


class _NdarrayMarker:
    """Stand-in for ``numpy.ndarray`` that is valid only as the first argument of ``_reconstruct``.

    The real class would let a pickle call ``numpy.ndarray(shape)`` and allocate any amount of
    memory, so the unpickler hands out this marker instead.
    """

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(
            "numpy.ndarray is called directly; the official CIFAR files only pass it to _reconstruct"
        )


_NDARRAY = _NdarrayMarker()


def _reconstruct_empty_array(subtype, shape, typecode):
    """Create the empty array that a pickled ndarray then fills from its state.

    Official files always request an empty ndarray of shape (0,), so any other request is rejected.
    """
    if subtype is not _NDARRAY or tuple(shape) != (0,):
        raise UnsafePickleError(
            f"_reconstruct called with subtype {subtype!r} and shape {shape!r}; "
            "official CIFAR files only rebuild a plain numpy.ndarray from shape (0,)"
        )
    return _NUMPY_RECONSTRUCT(np.ndarray, (0,), typecode)


def _numeric_dtype(spec, align=False, copy=True):
    """Build a numpy dtype from a pickled spec, accepting only bool, integer and float types.

    Object dtypes would let the array's state carry arbitrary pickled objects, so they are rejected.
    """
    if isinstance(spec, bytes):
        spec = spec.decode("ascii")
    dtype = np.dtype(spec, align, copy)
    if dtype.kind not in "biuf" or dtype.hasobject:
        raise UnsafePickleError(
            f"dtype {dtype!r} is not allowed; official CIFAR files contain only numeric arrays"
        )
    return dtype


# (module, name) -> object the restricted unpickler returns. numpy 1 wrote the reconstruct
# function as numpy.core.multiarray and numpy 2 writes it as numpy._core.multiarray.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _numeric_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild a numeric array.

    The official CIFAR batches contain dicts, lists, ints, byte strings and uint8 numpy arrays.
    Arrays are the only objects that need a global (``_reconstruct``, ``ndarray`` and ``dtype``),
    so every other global, such as ``os.system``, raises ``UnsafePickleError``.
    """

    def find_class(self, module: str, name: str):
        """Return the allowed object for ``module.name`` or raise ``UnsafePickleError``."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"global {module}.{name} is forbidden; official CIFAR files only reference "
                "numpy's _reconstruct, ndarray and dtype"
            ) from None


def load_restricted_pickle(data: bytes, where: str):
    """Unpickle ``data`` with ``RestrictedUnpickler`` and raise UsageError naming ``where`` on failure.

    ``encoding="bytes"`` keeps the Python 2 strings of the official files as bytes, which is
    what their keys (``b"data"``, ...) are.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as error:
        raise UsageError(
            f"{where} was rejected while unpickling: {error}. It is not an official CIFAR file; "
            f"replace it with the archive from {CIFAR_URL}"
        ) from error
    # A truncated or corrupted pickle raises one of these from inside the unpickler.
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, struct.error) as error:
        raise UsageError(
            f"{where} is not a readable pickle ({type(error).__name__}: {error}); it may be truncated "
            f"or corrupted, so fetch it again from {CIFAR_URL}"
        ) from error


# --------------------------------------------------------------------------------------------
# Locating and reading the files
# --------------------------------------------------------------------------------------------


def md5_of_file(path: str | os.PathLike) -> str:
    """Return the MD5 hex digest of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _layout_message(spec: CifarSpec, root: Path) -> str:
    """Describe the expected layout under ``root`` and where to fetch the archive."""
    files = ", ".join(spec.all_files)
    return (
        f"expected '{root / spec.folder}' containing {files}, or the archive '{root / spec.archive}'. "
        f"Download the {spec.title} python version from {CIFAR_URL} and place the archive or its "
        "extracted folder there"
    )


def _locate(spec: CifarSpec, data_dir: Path) -> tuple[Path | None, Path]:
    """Return the archive path (or None) and the extracted folder path for ``data_dir``.

    ``data_dir`` may be the extracted folder itself or its parent. The archive is looked for in
    ``data_dir`` and, when ``data_dir`` is the extracted folder, also in its parent, which is
    where the archive is when it was unpacked in place.
    """
    is_folder_itself = data_dir.name == spec.folder or (data_dir / spec.train_files[0]).is_file()
    if is_folder_itself:
        folder = data_dir
        archive_candidates = [data_dir / spec.archive, data_dir.parent / spec.archive]
    else:
        folder = data_dir / spec.folder
        archive_candidates = [data_dir / spec.archive]
    archive = next((path for path in archive_candidates if path.is_file()), None)
    return archive, folder


def _read_archive_members(spec: CifarSpec, archive: Path) -> dict[str, bytes]:
    """Read the batch files out of the archive without extracting anything to disk."""
    contents = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for file_name in spec.all_files:
                member_name = f"{spec.folder}/{file_name}"
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    raise UsageError(
                        f"archive '{archive}' has no member '{member_name}'; "
                        f"fetch the {spec.title} python version again from {CIFAR_URL}"
                    ) from None
                extracted = tar.extractfile(member) if member.isfile() else None
                if extracted is None:
                    raise UsageError(
                        f"archive member '{member_name}' in '{archive}' is not a regular file; "
                        f"fetch the {spec.title} python version again from {CIFAR_URL}"
                    )
                contents[file_name] = extracted.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise UsageError(
            f"archive '{archive}' cannot be read as tar.gz ({error}); "
            f"fetch it again from {CIFAR_URL}"
        ) from error
    return contents


def _read_folder_files(spec: CifarSpec, folder: Path, data_dir: Path) -> dict[str, bytes]:
    """Read the batch files from the extracted folder, naming every missing file at once."""
    missing = [name for name in spec.all_files if not (folder / name).is_file()]
    if missing:
        found = "no such folder" if not folder.is_dir() else f"missing {', '.join(missing)}"
        raise UsageError(
            f"{spec.title} was not found in '{data_dir}' ({found}): {_layout_message(spec, data_dir)}"
        )
    return {name: (folder / name).read_bytes() for name in spec.all_files}


def _check_batch(batch, spec: CifarSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one unpickled batch and return its images (N, 3072) and labels (N,) as arrays."""
    fix = f"fetch the {spec.title} python version again from {CIFAR_URL}"
    if not isinstance(batch, dict):
        raise UsageError(f"{where} contains a {type(batch).__name__}, not a dict; {fix}")
    for key in (b"data", spec.label_key):
        if key not in batch:
            raise UsageError(f"{where} has no key {key!r}; {fix}")

    # Images: uint8 rows of 3072 bytes.
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_LENGTH:
        description = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UsageError(f"{where}: b'data' is a {description}, expected uint8 of shape (N, {ROW_LENGTH}); {fix}")

    # Labels: one int per row, each a valid class index.
    labels = batch[spec.label_key]
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(label, (int, np.integer)) for label in labels):
        raise UsageError(f"{where}: {spec.label_key!r} is not a list of ints; {fix}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise UsageError(
            f"{where}: {labels.shape[0]} labels for {data.shape[0]} images; {fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UsageError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}], "
            f"outside [0, {spec.num_classes - 1}]; {fix}"
        )
    return data, labels


def _class_names(meta, spec: CifarSpec, where: str) -> tuple[str, ...]:
    """Return the class names from the unpickled meta file, checking that there are ``num_classes``."""
    names = meta.get(spec.class_names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) != spec.num_classes or not all(isinstance(n, bytes) for n in names):
        raise UsageError(
            f"{where} does not list {spec.num_classes} class names under {spec.class_names_key!r}; "
            f"fetch the {spec.title} python version again from {CIFAR_URL}"
        )
    return tuple(name.decode("utf-8", errors="replace") for name in names)


@dataclass(frozen=True)
class CifarData:
    """A CIFAR data set in memory: uint8 images (N, 3, 32, 32), int64 labels, statistics and hash.

    ``mean`` and ``std`` are the per-channel mean and population standard deviation of the
    training images on the [0, 1] scale (pixel / 255), for ``normalize``. ``sha256`` covers the
    four tensors, so the same images give the same hash whether read from the archive or from
    the extracted folder. ``source`` records where they came from.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str
    source: dict

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (channels, height, width)."""
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict:
        """Return the data set's name, sizes, statistics, hash and source as plain data."""
        return {
            "name": self.name,
            "n_train": int(self.y_train.numel()),
            "n_test": int(self.y_test.numel()),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
            "sha256": self.sha256,
            "source": dict(self.source),
        }


def load_cifar(
    name: str,
    data_dir: str | os.PathLike | None,
    *,
    expected_sizes: tuple[int, int] | None = OFFICIAL_SIZES,
    archive_md5: str | None = None,
) -> CifarData:
    """Load CIFAR-10 (``"cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels) from ``data_dir``.

    ``data_dir`` is the extracted folder (``cifar-10-batches-py`` or ``cifar-100-python``) or its
    parent. When the ``.tar.gz`` archive is present, its MD5 must equal ``archive_md5`` (by
    default the published digest) and the batches are read from it. Otherwise the extracted files
    are read. Either way every batch is checked for shape, dtype and label range, and the split
    sizes must equal ``expected_sizes`` (training, test) unless it is None, which is meant for
    small synthetic folders such as those ``write_cifar_folder`` makes.

    Raises:
        UsageError: the folder, a file or the archive is missing, unreadable or not in the
            official format, or a checksum or size differs. The message names the path and the fix.
    """
    if name not in CIFAR_SPECS:
        raise UsageError(f"CIFAR data set {name!r} is unknown; choose one of {', '.join(CIFAR_SPECS)}")
    spec = CIFAR_SPECS[name]
    if data_dir is None:
        raise UsageError(
            f"--data {name} needs --data-dir: pass the folder that contains '{spec.folder}' or "
            f"'{spec.archive}', downloaded from {CIFAR_URL}"
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise UsageError(f"--data-dir '{root}' is not an existing folder; {_layout_message(spec, root)}")

    # Read the raw bytes of every file, from the checked archive when there is one.
    archive, folder = _locate(spec, root)
    if archive is not None:
        expected_md5 = spec.archive_md5 if archive_md5 is None else archive_md5
        actual_md5 = md5_of_file(archive)
        if actual_md5 != expected_md5:
            raise UsageError(
                f"archive '{archive}' has MD5 {actual_md5}, expected {expected_md5}; the download is "
                f"incomplete or not the official file, so fetch it again from {CIFAR_URL}"
            )
        contents = _read_archive_members(spec, archive)
        source = {"kind": "archive", "path": str(archive), "md5": actual_md5}
    else:
        contents = _read_folder_files(spec, folder, root)
        source = {"kind": "folder", "path": str(folder), "md5": None}

    # Unpickle and check each batch, then join the training batches.
    def read_split(file_names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for file_name in file_names:
            where = f"{spec.title} file '{file_name}' from '{source['path']}'"
            batch_images, batch_labels = _check_batch(load_restricted_pickle(contents[file_name], where), spec, where)
            images.append(batch_images)
            labels.append(batch_labels)
        x = torch.from_numpy(np.concatenate(images)).reshape(-1, *IMAGE_SHAPE)
        y = torch.from_numpy(np.concatenate(labels))
        return x, y

    x_train, y_train = read_split(spec.train_files)
    x_test, y_test = read_split(spec.test_files)
    meta_where = f"{spec.title} file '{spec.meta_file}' from '{source['path']}'"
    class_names = _class_names(load_restricted_pickle(contents[spec.meta_file], meta_where), spec, meta_where)

    # The official splits have fixed sizes; a shortfall means a damaged or partial copy.
    sizes = (int(y_train.numel()), int(y_test.numel()))
    if expected_sizes is not None and sizes != tuple(expected_sizes):
        raise UsageError(
            f"{spec.title} in '{source['path']}' has {sizes[0]} training and {sizes[1]} test images, "
            f"expected {expected_sizes[0]} and {expected_sizes[1]}; fetch it again from {CIFAR_URL}"
        )
    if min(sizes) == 0:
        raise UsageError(f"{spec.title} in '{source['path']}' has an empty split {sizes}; fetch it again from {CIFAR_URL}")

    mean, std = channel_mean_std(x_train)
    return CifarData(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=spec.num_classes,
        class_names=class_names,
        mean=mean,
        std=std,
        sha256=hash_tensors(x_train, y_train, x_test, y_test),
        source=source,
    )


def channel_mean_std(images: torch.Tensor, chunk_size: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and population standard deviation of uint8 images on the [0, 1] scale.

    Sums of pixels and of squared pixels are accumulated exactly in int64, chunk by chunk, so
    that no float copy of the whole set is made and the result does not depend on ``chunk_size``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"images must be uint8 of shape (N, C, H, W), got {images.dtype} of shape {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.int64)
    total_squares = torch.zeros(channels, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk_size):
        chunk = images[start:start + chunk_size].to(torch.int64)
        total += chunk.sum(dim=(0, 2, 3))
        total_squares += (chunk * chunk).sum(dim=(0, 2, 3))

    # E[x] and E[x^2] - E[x]^2 in float64 from the exact integer sums, then rescaled from 0..255.
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total.double() / count
    variance = (total_squares.double() / count - mean * mean).clamp_min(0.0)
    return tuple((mean / 255.0).tolist()), tuple((variance.sqrt() / 255.0).tolist())


# --------------------------------------------------------------------------------------------
# Augmentation: batched tensor operations that run on the images' device
# --------------------------------------------------------------------------------------------


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, C, H, W), got {shape}")


def random_crop(images: torch.Tensor, generator: torch.Generator, *, padding: int = 4) -> torch.Tensor:
    """Pad each image with ``padding`` zeros on every side and cut a random window of the original size.

    The top-left corner of each window is drawn uniformly from the (2 * padding + 1)^2 positions,
    independently per image. The offsets are drawn on ``generator``'s device and moved to the
    images' device, so a CPU generator gives the same crops for images on any device.
    """
    _check_images(images)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    batch, _, height, width = images.shape
    if padding == 0 or batch == 0:
        return images.clone()

    # One (row, column) offset per image into the padded image.
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator, device=generator.device)
    offsets = offsets.to(images.device)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)
    cols = offsets[1, :, None] + torch.arange(width, device=images.device)

    # Gather every window at once with broadcast indices of shape (N, C, H, W).
    padded = F.pad(images, (padding, padding, padding, padding))
    batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
    channel_index = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def random_horizontal_flip(
    images: torch.Tensor, generator: torch.Generator, *, probability: float = 0.5
) -> torch.Tensor:
    """Mirror each image left to right with ``probability``, independently per image."""
    _check_images(images)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability!r}")
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device) < probability
    flip = flip.to(images.device)[:, None, None, None]
    return torch.where(flip, images.flip(-1), images)


def _square_mask(
    centre_rows: torch.Tensor, centre_cols: torch.Tensor, size: int, height: int, width: int
) -> torch.Tensor:
    """Return a bool mask (N, H, W) of squares with side ``size`` at the given centres, clipped at the border.

    Square n covers rows ``centre_rows[n] - size // 2`` up to but excluding that plus ``size``,
    and the same for columns. Parts outside the image are dropped.
    """
    device = centre_rows.device
    top = centre_rows - size // 2
    left = centre_cols - size // 2
    row_range = torch.arange(height, device=device)
    col_range = torch.arange(width, device=device)
    in_rows = (row_range >= top[:, None]) & (row_range < top[:, None] + size)
    in_cols = (col_range >= left[:, None]) & (col_range < left[:, None] + size)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cutout(images: torch.Tensor, generator: torch.Generator, *, size: int = 16) -> torch.Tensor:
    """Zero one square of side ``size`` in each image, on all channels (Cutout, DeVries & Taylor 2017).

    The centre is drawn uniformly over all pixels, as DeVries & Taylor (2017) do, so a square
    near the border is clipped and covers between ``ceil(size / 2)`` and ``size`` pixels per side.
    Applied after ``normalize``, the zeroed pixels take the training-set mean colour. ``size=0``
    returns an unchanged copy.
    """
    _check_images(images)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    batch, _, height, width = images.shape
    if size == 0 or batch == 0:
        return images.clone()
    centre_rows = torch.randint(0, height, (batch,), generator=generator, device=generator.device)
    centre_cols = torch.randint(0, width, (batch,), generator=generator, device=generator.device)
    mask = _square_mask(centre_rows.to(images.device), centre_cols.to(images.device), size, height, width)
    return images.masked_fill(mask[:, None], 0)


def normalize(
    images: torch.Tensor,
    mean: tuple[float, ...] | torch.Tensor,
    std: tuple[float, ...] | torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Convert uint8 images to ``dtype`` on the [0, 1] scale and standardize each channel.

    Returns ``(images / 255 - mean) / std`` with ``mean`` and ``std`` per channel on the [0, 1]
    scale, such as ``CifarData.mean`` and ``CifarData.std``.
    """
    _check_images(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images in 0..255, got {images.dtype}; pass the stored uint8 batch")
    mean = torch.as_tensor(mean, dtype=dtype, device=images.device).reshape(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=dtype, device=images.device).reshape(1, -1, 1, 1)
    if mean.shape[1] != images.shape[1] or std.shape[1] != images.shape[1]:
        raise ValueError(
            f"mean and std need one value per channel ({images.shape[1]}), got {mean.shape[1]} and {std.shape[1]}"
        )
    if bool((std <= 0).any()):
        raise ValueError(f"std must be positive in every channel, got {std.flatten().tolist()}")
    return (images.to(dtype) / 255.0 - mean) / std


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    mean: tuple[float, ...] | torch.Tensor,
    std: tuple[float, ...] | torch.Tensor,
    padding: int = 4,
    flip_probability: float = 0.5,
    cutout_size: int = 16,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Apply the standard CIFAR training augmentation to a uint8 batch and return normalized floats.

    The steps are a random crop with ``padding`` zero pixels, a horizontal flip with
    ``flip_probability``, ``normalize``, then Cutout with side ``cutout_size`` (0 disables it).
    All random draws come from ``generator`` in a fixed order, so the same generator state gives
    the same batch.
    """
    images = random_crop(images, generator, padding=padding)
    images = random_horizontal_flip(images, generator, probability=flip_probability)
    images = normalize(images, mean, std, dtype=dtype)
    return cutout(images, generator, size=cutout_size)


# --------------------------------------------------------------------------------------------
# Writing small folders in the official format
# --------------------------------------------------------------------------------------------


class _Python2Pickler(pickle._Pickler):
    """Pickler that writes protocol 2 as Python 2's cPickle did for the official CIFAR files.

    Python 3 writes bytes at protocol 2 through the global ``_codecs.encode``, which the
    official files never contain. This pickler writes bytes and str as Python 2 byte strings
    (SHORT_BINSTRING / BINSTRING) and names numpy's reconstruct function
    ``numpy.core.multiarray._reconstruct``, as numpy 1 did.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_string(self, obj) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_python2_string
    dispatch[str] = save_python2_string

    def save_global(self, obj, name=None) -> None:
        if obj is _NUMPY_RECONSTRUCT:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def _python2_pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _batch_files(spec: CifarSpec, x_train, y_train, x_test, y_test, class_names) -> dict[str, bytes]:
    """Return file name -> pickled contents for a folder in ``spec``'s official layout."""

    def batch(images: np.ndarray, labels: np.ndarray, batch_label: str, prefix: str) -> dict:
        contents = {
            b"batch_label": batch_label.encode(),
            spec.label_key: [int(label) for label in labels],
            b"data": np.ascontiguousarray(images.reshape(len(images), ROW_LENGTH)),
            b"filenames": [f"{prefix}_{i}.png".encode() for i in range(len(images))],
        }
        if spec.name == "cifar100":
            # NOTE: synthetic coarse labels (fine // 5); the real superclass mapping is different.
            contents[b"coarse_labels"] = [int(label) // 5 for label in labels]
        return contents

    files = {}
    train_parts = np.array_split(np.arange(len(x_train)), len(spec.train_files))
    for part_number, (file_name, indices) in enumerate(zip(spec.train_files, train_parts), start=1):
        label = f"training batch {part_number} of {len(spec.train_files)}"
        files[file_name] = _python2_pickle_bytes(batch(x_train[indices], y_train[indices], label, "train"))
    files[spec.test_files[0]] = _python2_pickle_bytes(batch(x_test, y_test, "testing batch 1 of 1", "test"))

    names = [name.encode() for name in class_names]
    if spec.name == "cifar10":
        meta = {b"label_names": names, b"num_cases_per_batch": len(train_parts[0]), b"num_vis": ROW_LENGTH}
    else:
        meta = {b"fine_label_names": names, b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)]}
    files[spec.meta_file] = _python2_pickle_bytes(meta)
    return files


def write_cifar_folder(
    data_dir: str | os.PathLike,
    name: str,
    *,
    x_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    x_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    extracted: bool = True,
    archive: bool = False,
) -> str | None:
    """Write images and labels as a CIFAR folder and/or archive in the official layout under ``data_dir``.

    Meant for small synthetic data sets in tests and smoke runs, read back with
    ``load_cifar(..., expected_sizes=None, archive_md5=...)``. Images are uint8 of shape
    (N, 3, 32, 32). The pickles are protocol 2 in the byte-string form of the official files.
    CIFAR-10 training images are split over the five batch files in order. Returns the MD5 of
    the archive when ``archive`` is true, else None.
    """
    if name not in CIFAR_SPECS:
        raise ValueError(f"CIFAR data set {name!r} is unknown; choose one of {', '.join(CIFAR_SPECS)}")
    spec = CIFAR_SPECS[name]
    arrays = [np.asarray(array) for array in (x_train, y_train, x_test, y_test)]
    for label, images in (("x_train", arrays[0]), ("x_test", arrays[2])):
        if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
            raise ValueError(f"{label} must be uint8 of shape (N, 3, 32, 32), got {images.dtype} {images.shape}")
    class_names = [f"class_{i}" for i in range(spec.num_classes)]
    files = _batch_files(spec, *arrays, class_names)

    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    if extracted:
        folder = root / spec.folder
        folder.mkdir(exist_ok=True)
        for file_name, contents in files.items():
            (folder / file_name).write_bytes(contents)
    if not archive:
        return None

    # Members sit under the folder name, as in the official archive.
    archive_path = root / spec.archive
    with tarfile.open(archive_path, "w:gz") as tar:
        for file_name, contents in files.items():
            info = tarfile.TarInfo(f"{spec.folder}/{file_name}")
            info.size = len(contents)
            tar.addfile(info, io.BytesIO(contents))
    return md5_of_file(archive_path)
