"""A run's data on its training device: MNIST-1D as floats, CIFAR and image folders as uint8 images.

CIFAR images stay uint8 in memory (50000 x 3072 bytes, about 150 MB for the training set) and
become float32 only batch by batch. A training batch is augmented on the device by
``crsam.cifar.augment``: a random crop after zero padding of 4 pixels, a horizontal flip with
probability 1/2, normalization, and Cutout when ``cutout`` is set. Evaluation batches are only
normalized. Normalization uses the per-channel mean and standard deviation of the training
images. For the official CIFAR-10 training set these are the values commonly quoted as
(0.4914, 0.4822, 0.4465) and (0.2470, 0.2435, 0.2616).

Every random draw of the augmentation comes from a CPU ``torch.Generator`` passed in by the run,
so a checkpoint can store its state and the same state gives the same batch on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from crsam.cifar import CifarData, augment, normalize
from crsam.data import Dataset
from crsam.imagefolder import ImageFolderData

# Zero padding of the random crop, in pixels on every side, as in the standard CIFAR recipe.
CROP_PADDING = 4

# Data sets held as uint8 images (N, 3, H, W) and augmented batch by batch.
IMAGE_DATA_TYPES = (CifarData, ImageFolderData)


class TrainingData:
    """The training and test split of a data set, on ``device``, with their batch transformations."""

    def __init__(
        self, data: Dataset | CifarData | ImageFolderData, *, device: torch.device, cutout: int | None = None
    ) -> None:
        self.source = data
        self.device = device
        self.is_image_data = isinstance(data, IMAGE_DATA_TYPES)
        self.cutout = cutout or 0
        self.x_train = data.x_train.to(device)
        self.y_train = data.y_train.to(device)
        self.x_test = data.x_test.to(device)
        self.y_test = data.y_test.to(device)
        if self.is_image_data:
            self.mean = torch.tensor(data.mean, dtype=torch.float32, device=device)
            self.std = torch.tensor(data.std, dtype=torch.float32, device=device)

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return int(self.y_train.numel())

    def training_batch(
        self, indices: torch.Tensor, generator: torch.Generator, *, share: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the training examples at ``indices`` as model inputs, augmented for image data.

        ``generator`` (on the CPU) supplies the augmentation's random draws. MNIST-1D is not
        augmented and draws nothing from it. With ``share``, ``indices`` is the global batch of
        all ranks and only the examples at ``indices[share]`` are returned. Image data is then
        augmented as the whole global batch and cut afterwards, so every rank draws the same
        numbers from ``generator`` and each example gets the crop, flip and Cutout square that a
        one-process run gives it. Each rank thus augments all images of the global batch.
        """
        if not self.is_image_data:
            if share is not None:
                indices = indices[share]
            indices = indices.to(self.device)
            return self.x_train[indices], self.y_train[indices]

        indices = indices.to(self.device)
        x, y = self.x_train[indices], self.y_train[indices]
        x = augment(x, generator, mean=self.mean, std=self.std, padding=CROP_PADDING, cutout_size=self.cutout)
        if share is not None:
            x, y = x[share], y[share]
        return x, y

    def model_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Return stored examples as model inputs without augmentation: normalized floats for images."""
        if self.is_image_data:
            return normalize(x, self.mean, self.std)
        return x

    @property
    def input_transform(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The evaluation transformation for ``evaluate``, or None when inputs are used as stored."""
        return self.model_inputs if self.is_image_data else None


def cifar_as_float_dataset(data: CifarData | ImageFolderData) -> Dataset:
    """Return ``data`` as a ``Dataset`` of normalized float32 images on the CPU, as evaluation uses them.

    Certificates and curvature measurements of a checkpoint read inputs as they are, so they get
    the images that training evaluated. The float copy takes 4 bytes per pixel (about 600 MB for
    the CIFAR training set).
    """
    return Dataset(
        name=data.name,
        x_train=normalize(data.x_train, data.mean, data.std),
        y_train=data.y_train,
        x_test=normalize(data.x_test, data.mean, data.std),
        y_test=data.y_test,
        num_classes=data.num_classes,
        sha256=data.sha256,
        generation={"source": dict(data.source), "mean": list(data.mean), "std": list(data.std)},
    )
