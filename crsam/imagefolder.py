"""Image classification data in class folders (the ImageNet layout), decoded into memory as uint8.

The data folder ``ROOT`` contains a training split and a test split, each with one subfolder per
class::

    ROOT/train/CLASS_A/img001.jpg      ROOT/val/CLASS_A/img101.jpg
    ROOT/train/CLASS_B/...             ROOT/val/CLASS_B/...

The test split is ``val/`` when it exists, else ``test/``. The class names are the subfolder
names, sorted by code point, and a class's label is its index in that order. Both splits must
have the same classes. A class folder contributes the files directly inside it whose names end in
.png, .jpg, .jpeg, .bmp or .webp, in any case. Hidden entries (names starting with ".") and other
files are skipped, and nested folders are not searched. Images are read in sorted file-name
order.

Each image is decoded with Pillow and converted to RGB. Grayscale and palette images are expanded,
and an alpha channel is dropped without compositing. The EXIF orientation tag is not applied.
The image is then cropped to its central square, whose side is the shorter edge. When an edge
exceeds that side by an odd number of pixels, the extra pixel is on the right or bottom. Finally,
the square is resized to ``image_size`` x ``image_size`` with Pillow's bilinear filter. When
Pillow shrinks, it widens the triangle filter by the scale factor, so the result averages the
source pixels instead of skipping some (antialiasing). The default size of 32 fits the CIFAR
models of ``crsam.vision_models``.

The decoded images are stored like CIFAR's: uint8 tensors of shape (N, 3, S, S), which take
N x 3 x S x S bytes (3.9 GB for ImageNet's 1.28 million training images at S = 32, 15.7 GB at
S = 64). ``crsam train`` keeps them on the training device and augments them there as it does
CIFAR. Normalization uses the per-channel mean and standard deviation of the decoded training
images rather than fixed ImageNet constants, because shrinking and cropping change the
statistics and because the folder need not hold ImageNet at all.

The data hash is the SHA-256 of the four decoded tensors (images and labels). It changes with
``image_size``, with any change to the decoded pixels or to the labels, and with a Pillow version
that rounds differently. Renaming class folders without changing their sorted order keeps it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from crsam.cifar import CifarData, channel_mean_std
from crsam.data import hash_tensors
from crsam.errors import UsageError

# File name endings read as images, compared in lower case.
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")

# Side of the decoded square images when --image-size is not passed: the CIFAR models' input size.
DEFAULT_IMAGE_SIZE = 32

# Folder names of the splits. The first test folder that exists is used.
TRAIN_FOLDER = "train"
TEST_FOLDERS = ("val", "test")

# Class names listed in one error message before the rest is counted.
MAX_LISTED_NAMES = 5

LAYOUT = "ROOT/train/CLASS/IMAGE and ROOT/val/CLASS/IMAGE (or ROOT/test/CLASS/IMAGE)"


@dataclass(frozen=True)
class ImageFolderData(CifarData):
    """An image-folder data set in memory: uint8 images (N, 3, S, S), int64 labels, statistics and hash.

    ``mean`` and ``std`` are the per-channel mean and population standard deviation of the
    training images on the [0, 1] scale (pixel / 255), for ``crsam.cifar.normalize``.
    ``sha256`` covers the four tensors. ``source`` records the folder, the split folders, the
    image size and the Pillow version that decoded the images.
    """

    def describe(self) -> dict:
        """Return the data set's name, sizes, class names, statistics, hash and source as plain data."""
        return {**super().describe(), "class_names": list(self.class_names)}


def import_pillow():
    """Return the ``PIL.Image`` module, or raise UsageError saying how to install Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(
            '--data imagefolder decodes images with Pillow, which is not installed; '
            'install it with pip install "crsam[images]"'
        ) from None
    return Image


def _listed(names: list[str]) -> str:
    """Join up to MAX_LISTED_NAMES names and count the rest."""
    joined = ", ".join(names[:MAX_LISTED_NAMES])
    if len(names) > MAX_LISTED_NAMES:
        joined += f" and {len(names) - MAX_LISTED_NAMES} more"
    return joined


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_split_folders(root: Path) -> tuple[Path, Path]:
    """Return the training and test split folders under ``root``, or raise UsageError naming the layout."""
    if not root.is_dir():
        raise UsageError(f"--data-dir '{root}' is not an existing folder; pass a folder laid out as {LAYOUT}")
    train_folder = root / TRAIN_FOLDER
    if not train_folder.is_dir():
        raise UsageError(f"'{root}' has no '{TRAIN_FOLDER}' folder; pass a --data-dir laid out as {LAYOUT}")
    for name in TEST_FOLDERS:
        if (root / name).is_dir():
            return train_folder, root / name
    raise UsageError(
        f"'{root}' has no '{TEST_FOLDERS[0]}' or '{TEST_FOLDERS[1]}' folder for the test split; "
        f"pass a --data-dir laid out as {LAYOUT}"
    )


def scan_split(folder: Path) -> dict[str, list[Path]]:
    """Return class name -> sorted image paths for the class subfolders of ``folder``, sorted by name.

    Raises:
        UsageError: ``folder`` has no class subfolder, or a class folder has no image file.
    """
    class_names = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not _is_hidden(entry.name)
    )
    if not class_names:
        raise UsageError(
            f"'{folder}' contains no class folders; put the images of each class in their own "
            f"subfolder, as in {LAYOUT}"
        )
    classes = {}
    for class_name in class_names:
        class_folder = folder / class_name
        file_names = sorted(
            entry.name
            for entry in os.scandir(class_folder)
            if entry.is_file()
            and not _is_hidden(entry.name)
            and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not file_names:
            raise UsageError(
                f"class folder '{class_folder}' contains no image files ({', '.join(IMAGE_EXTENSIONS)}, "
                "directly inside it); add its images or remove the folder"
            )
        classes[class_name] = [class_folder / name for name in file_names]
    return classes


def _check_same_classes(train_classes: list[str], test_classes: list[str], train_folder: Path, test_folder: Path) -> None:
    only_train = sorted(set(train_classes) - set(test_classes))
    only_test = sorted(set(test_classes) - set(train_classes))
    if not only_train and not only_test:
        return
    differences = []
    if only_train:
        differences.append(f"only in '{train_folder}': {_listed(only_train)}")
    if only_test:
        differences.append(f"only in '{test_folder}': {_listed(only_test)}")
    raise UsageError(
        f"the training and test splits have different classes ({'; '.join(differences)}); "
        "give both splits a folder for every class"
    )


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """Return the (left, top, right, bottom) box of the central square of a ``width`` x ``height`` image.

    The side is the shorter edge. An odd excess leaves its extra pixel on the right or bottom.

    >>> center_crop_box(40, 30)
    (5, 0, 35, 30)
    >>> center_crop_box(30, 41)
    (0, 5, 30, 35)
    """
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return left, top, left + side, top + side


def decode_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode the image at ``path`` into a uint8 array (3, image_size, image_size).

    The image is converted to RGB, cropped to its central square (``center_crop_box``) and
    resized with Pillow's bilinear filter, which is widened by the scale factor when shrinking.

    Raises:
        UsageError: Pillow is not installed, or the file cannot be decoded; the message names it.
    """
    Image = import_pillow()
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        square = image.crop(center_crop_box(*image.size))
        resized = square.resize((image_size, image_size), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.uint8)
    # Pillow reports unknown formats and truncated files as OSError, and some decoders raise the
    # others on malformed data. Oversized images raise DecompressionBombError.
    except (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError) as error:
        raise UsageError(
            f"image '{path}' cannot be decoded ({type(error).__name__}: {error}); replace or remove the file"
        ) from None
    # Pillow returns rows x columns x channels; the models take channels first.
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _decode_split(classes: dict[str, list[Path]], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every image of one split into preallocated tensors, so no second copy is ever held."""
    # NOTE: decoding is serial and nothing is cached, so every start, resume and certificate of a
    # run decodes the whole folder again, in every torchrun process.
    count = sum(len(paths) for paths in classes.values())
    images = torch.empty((count, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.int64)
    index = 0
    for label, paths in enumerate(classes.values()):
        for path in paths:
            images[index] = torch.from_numpy(decode_image(path, image_size))
            labels[index] = label
            index += 1
    return images, labels


def load_imagefolder(
    data_dir: str | os.PathLike | None, *, image_size: int = DEFAULT_IMAGE_SIZE
) -> ImageFolderData:
    """Decode the class folders under ``data_dir`` into uint8 images of side ``image_size``.

    ``data_dir`` contains ``train/`` and ``val/`` (or ``test/``), each with one subfolder per class
    (see the module docstring for the file rules and the crop and resize).

    Raises:
        UsageError: ``data_dir`` is None or not laid out as described, a class folder has no images,
            the splits have different classes, an image cannot be decoded, or Pillow is missing.
        ValueError: ``image_size`` is not a positive int.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if data_dir is None:
        raise UsageError(f"--data imagefolder needs --data-dir: pass the folder laid out as {LAYOUT}")
    root = Path(data_dir)
    train_folder, test_folder = find_split_folders(root)
    Image = import_pillow()
    pillow_version = Image.__version__

    # Scan both splits before decoding anything, so layout errors come at once.
    train_classes = scan_split(train_folder)
    test_classes = scan_split(test_folder)
    _check_same_classes(list(train_classes), list(test_classes), train_folder, test_folder)
    class_names = tuple(train_classes)
    if len(class_names) < 2:
        raise UsageError(
            f"'{train_folder}' has one class folder ({class_names[0]}); a classifier needs at least two, "
            "so add a folder for every class"
        )

    x_train, y_train = _decode_split(train_classes, image_size)
    x_test, y_test = _decode_split(test_classes, image_size)
    mean, std = channel_mean_std(x_train)
    source = {
        "kind": "imagefolder",
        "path": str(root),
        "train_folder": train_folder.name,
        "test_folder": test_folder.name,
        "image_size": image_size,
        "resize": "center crop to the shorter edge, then Pillow bilinear",
        "pillow_version": pillow_version,
    }
    return ImageFolderData(
        name="imagefolder",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(class_names),
        class_names=class_names,
        mean=mean,
        std=std,
        sha256=hash_tensors(x_train, y_train, x_test, y_test),
        source=source,
    )
