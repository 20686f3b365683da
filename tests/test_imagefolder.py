"""Image-folder data: scanning, decoding, crop and resize, errors, and training on it end to end.

Every test writes its own tiny class folders with Pillow. Most images have one constant colour,
which the centre crop and the bilinear resize keep exactly, so pixels and labels can be checked
against the colours written.
"""

import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from crsam import imagefolder
from crsam.checkpoint import load_checkpoint
from crsam.cli import main
from crsam.data import hash_tensors
from crsam.errors import UsageError
from crsam.imagefolder import center_crop_box, load_imagefolder
from crsam.train import build_run_model, resolve_options, restore_run, train

# Class folders in the order they are written, and the sorted order that sets the labels.
WRITTEN_CLASSES = ("cat", "ant", "bee")
SORTED_CLASSES = ("ant", "bee", "cat")
WIDTH, HEIGHT = 40, 30
SPLIT_SIZES = {"train": 4, "val": 2}

# A ResNet-18 with 2 channels in its first stage trains an epoch of 12 images in well under a second.
TINY_RUN = {"data": "imagefolder", "model": "resnet18", "width": 2, "batch_size": 4, "epochs": 2, "seed": 5,
            "optimizer": "crsam", "device": "cpu"}


def colour(class_name, split, index):
    """Return the constant RGB colour of one written image, distinct for every image."""
    class_index = SORTED_CLASSES.index(class_name)
    split_offset = 0 if split == "train" else 100
    return (10 + 80 * class_index, 20 + 30 * index + split_offset, 250 - 70 * class_index)


def file_name(class_name, index):
    """Vary the format and the case of the extension, all lossless so colours survive exactly."""
    names = {"ant": f"{index}.png", "bee": f"{index}.PNG" if index % 2 else f"{index}.bmp",
             "cat": f"{index}.webp"}
    return names[class_name]


def save(pixels, path):
    image = Image.fromarray(pixels)
    options = {"lossless": True} if path.suffix.lower() == ".webp" else {}
    image.save(path, **options)


def write_tiny_folder(root, *, test_folder="val"):
    """Write 3 classes with 4 training and 2 test images of 40x30 pixels, plus entries to skip."""
    for split, count in SPLIT_SIZES.items():
        folder = root / (test_folder if split == "val" else split)
        for class_name in WRITTEN_CLASSES:
            (folder / class_name).mkdir(parents=True)
            for index in range(count):
                pixels = np.full((HEIGHT, WIDTH, 3), colour(class_name, split, index), dtype=np.uint8)
                save(pixels, folder / class_name / file_name(class_name, index))

        # Entries that the scan skips: hidden files and folders, other extensions, loose files.
        black = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        save(black, folder / "ant" / ".hidden.png")
        (folder / "ant" / "notes.txt").write_text("not an image")
        (folder / ".cache" / "junk").mkdir(parents=True)
        save(black, folder / ".cache" / "junk" / "0.png")
        (folder / "README").write_text("a loose file beside the class folders")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("images"))


def expected_split(split, count):
    images = [np.full((3, 32, 32), np.array(colour(name, split, index))[:, None, None], dtype=np.uint8)
              for name in SORTED_CLASSES for index in range(count)]
    labels = [label for label in range(len(SORTED_CLASSES)) for _ in range(count)]
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


# ---------------------------------------------------------------------------- scanning and decoding


def test_labels_follow_sorted_classes(folder):
    data = load_imagefolder(folder)
    assert data.class_names == SORTED_CLASSES
    assert data.num_classes == 3
    assert data.x_train.dtype == torch.uint8
    assert data.x_train.shape == (12, 3, 32, 32)
    assert data.x_test.shape == (6, 3, 32, 32)

    # A constant image stays constant through the crop and the resize, so every pixel is exact.
    expected_x_train, expected_y_train = expected_split("train", 4)
    expected_x_test, expected_y_test = expected_split("val", 2)
    assert torch.equal(data.y_train, expected_y_train)
    assert torch.equal(data.y_test, expected_y_test)
    assert torch.equal(data.x_train, expected_x_train)
    assert torch.equal(data.x_test, expected_x_test)


def test_statistics_from_training_colours(folder):
    data = load_imagefolder(folder, image_size=8)
    colours = np.array([colour(name, "train", index) for name in SORTED_CLASSES for index in range(4)], dtype=float)
    # Every image is one colour, so the pixel statistics are those of the 12 colours. The module
    # sums exact integers and divides once in float64, so only a few ulps of 1 separate them.
    assert data.mean == pytest.approx(tuple(colours.mean(axis=0) / 255), abs=1e-12)
    assert data.std == pytest.approx(tuple(colours.std(axis=0) / 255), abs=1e-12)


def test_hash_covers_tensors_and_size(folder):
    data = load_imagefolder(folder)
    assert data.sha256 == hash_tensors(data.x_train, data.y_train, data.x_test, data.y_test)
    assert load_imagefolder(folder).sha256 == data.sha256
    assert load_imagefolder(folder, image_size=16).sha256 != data.sha256
    record = data.describe()
    assert record["class_names"] == list(SORTED_CLASSES)
    assert record["source"]["test_folder"] == "val"
    assert record["source"]["image_size"] == 32
    assert record["source"]["pillow_version"] == Image.__version__


def test_test_folder_used_without_val(tmp_path):
    data = load_imagefolder(write_tiny_folder(tmp_path, test_folder="test"))
    assert data.source["test_folder"] == "test"
    assert torch.equal(data.x_test, expected_split("val", 2)[0])


def test_grayscale_and_alpha_become_rgb(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "gray").mkdir(parents=True)
        (tmp_path / split / "rgba").mkdir(parents=True)
        Image.fromarray(np.full((6, 9), 77, dtype=np.uint8), mode="L").save(tmp_path / split / "gray" / "0.png")
        rgba = np.full((6, 9, 4), (200, 100, 50, 0), dtype=np.uint8)
        Image.fromarray(rgba, mode="RGBA").save(tmp_path / split / "rgba" / "0.png")
    data = load_imagefolder(tmp_path, image_size=4)
    assert torch.equal(data.x_train[0], torch.full((3, 4, 4), 77, dtype=torch.uint8))
    # The alpha channel is dropped, not composited: a transparent pixel keeps its colour.
    assert torch.equal(data.x_train[1], torch.tensor([200, 100, 50], dtype=torch.uint8)[:, None, None].expand(3, 4, 4))


# ---------------------------------------------------------------------------- crop and resize


@pytest.mark.parametrize(
    ("width", "height", "box"),
    [
        (40, 30, (5, 0, 35, 30)),
        (30, 40, (0, 5, 30, 35)),
        (41, 30, (5, 0, 35, 30)),
        (30, 31, (0, 0, 30, 30)),
        (32, 32, (0, 0, 32, 32)),
        (1, 5, (0, 2, 1, 3)),
    ],
)
def test_center_crop_box(width, height, box):
    assert center_crop_box(width, height) == box


def test_crop_drops_the_margins(tmp_path):
    # Blue centre square, red margins: any margin pixel inside the crop, or a resize that reads
    # pixels outside the crop, would mix red into the 15x15 result.
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[:, :, 0] = 255
    pixels[:, 5:35] = (0, 0, 255)
    path = tmp_path / "framed.png"
    Image.fromarray(pixels).save(path)
    decoded = imagefolder.decode_image(path, 15)
    assert decoded.shape == (3, 15, 15)
    assert np.array_equal(decoded, np.broadcast_to(np.array([0, 0, 255], dtype=np.uint8)[:, None, None], (3, 15, 15)))


def bilinear_matrix(size_in, size_out):
    """Return the float64 (size_out, size_in) weights of Pillow's bilinear resize along one axis.

    Pillow (src/libImaging/Resample.c) centres output pixel i at (i + 0.5) * scale in input coordinates, with
    scale = size_in / size_out, and weights input pixel j by the triangle 1 - |t| at
    t = (j + 0.5 - centre) / max(scale, 1), normalized to sum 1 over the pixels in the image.
    """
    scale = size_in / size_out
    centres = (np.arange(size_out) + 0.5) * scale
    distance = np.abs(np.arange(size_in)[None, :] + 0.5 - centres[:, None]) / max(scale, 1.0)
    weights = np.clip(1.0 - distance, 0.0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_tolerance(size_in, size_out):
    """Bound |Pillow's uint8 result - the exact float64 resize| for one output pixel.

    Pillow resizes rows, rounds to uint8, then resizes columns and rounds again. Each rounding
    is off by at most 1/2, and the second pass is a convex combination, so it carries the first
    error over without growth: 1/2 + 1/2 in all. Pillow also stores each weight as an integer
    multiple of 2**-22, off by at most 2**-23, so a pass with k weights adds at most
    k * 2**-23 * 255 on top.
    """
    taps = int((bilinear_matrix(size_in, size_out) > 0).sum(axis=1).max())
    return 1.0 + 2 * taps * 2**-23 * 255


@pytest.mark.parametrize("size", [12, 30, 45])
def test_bilinear_resize_matches_exact(tmp_path, size):
    # A JPEG of random pixels: the decoder's output is the reference, so JPEG loss does not
    # enter, and random pixels make a misplaced crop or a wrong filter visible.
    rng = np.random.default_rng(size)
    path = tmp_path / "noise.jpg"
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path, quality=90)
    full = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

    def exact_resize(left):
        square = full[:, left:left + HEIGHT]
        matrix = bilinear_matrix(HEIGHT, size)
        return np.einsum("ij,jkc,lk->cil", matrix, square, matrix)

    decoded = imagefolder.decode_image(path, size).astype(np.float64)
    tolerance = resize_tolerance(HEIGHT, size)
    assert np.abs(decoded - exact_resize(5)).max() <= tolerance
    # The comparison can fail: the crop one pixel to either side is far outside the tolerance.
    assert np.abs(decoded - exact_resize(4)).max() > 10 * tolerance
    assert np.abs(decoded - exact_resize(6)).max() > 10 * tolerance


# ---------------------------------------------------------------------------- errors


def write_classes(split_folder, classes, *, images=1):
    for class_name in classes:
        (split_folder / class_name).mkdir(parents=True)
        for index in range(images):
            Image.new("RGB", (4, 4), (index, 0, 0)).save(split_folder / class_name / f"{index}.png")


def missing_root(root):
    return root / "nothing"


def no_train(root):
    write_classes(root / "val", ["a", "b"])
    return root


def no_test(root):
    write_classes(root / "train", ["a", "b"])
    return root


def no_classes(root):
    (root / "train").mkdir()
    (root / "train" / "loose.png").write_bytes(b"")
    write_classes(root / "val", ["a", "b"])
    return root


def class_without_images(root):
    write_classes(root / "train", ["a", "b"])
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("no images here")
    write_classes(root / "val", ["a", "b", "empty"])
    return root


def different_classes(root):
    write_classes(root / "train", ["a", "b", "c"])
    write_classes(root / "val", ["a", "b", "d"])
    return root


def unreadable_image(root):
    write_classes(root / "train", ["a", "b"])
    write_classes(root / "val", ["a", "b"])
    (root / "train" / "b" / "broken.png").write_bytes(b"these bytes are not a PNG")
    return root


def truncated_image(root):
    write_classes(root / "train", ["a", "b"])
    write_classes(root / "val", ["a", "b"])
    path = root / "val" / "a" / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])
    return root


def one_class(root):
    write_classes(root / "train", ["a"])
    write_classes(root / "val", ["a"])
    return root


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (missing_root, r"--data-dir '.*nothing' is not an existing folder; pass a folder laid out as ROOT/train/CLASS"),
        (no_train, r"'.*' has no 'train' folder; pass a --data-dir laid out as"),
        (no_test, r"'.*' has no 'val' or 'test' folder for the test split"),
        (no_classes, r"'.*train' contains no class folders; put the images of each class in their own subfolder"),
        (class_without_images, r"class folder '.*train/empty' contains no image files \(\.bmp, \.jpeg, \.jpg, "
                               r"\.png, \.webp, directly inside it\); add its images or remove the folder"),
        (different_classes, r"the training and test splits have different classes \(only in '.*train': c; "
                            r"only in '.*val': d\); give both splits a folder for every class"),
        (unreadable_image, r"image '.*train/b/broken\.png' cannot be decoded \(UnidentifiedImageError: .*\); "
                           r"replace or remove the file"),
        (truncated_image, r"image '.*val/a/cut\.jpg' cannot be decoded \(OSError: .+\); replace or remove the file"),
        (one_class, r"'.*train' has one class folder \(a\); a classifier needs at least two"),
    ],
)
def test_layout_errors(tmp_path, build, message):
    root = build(tmp_path)
    with pytest.raises(UsageError, match=message):
        load_imagefolder(root)


def test_many_differing_classes_counted(tmp_path):
    write_classes(tmp_path / "train", ["a", *[f"t{i}" for i in range(7)]])
    write_classes(tmp_path / "val", ["a", "v"])
    with pytest.raises(UsageError, match=r"only in '.*train': t0, t1, t2, t3, t4 and 2 more; only in '.*val': v\)"):
        load_imagefolder(tmp_path)


def test_missing_pillow_names_extra(folder, monkeypatch):
    # None in sys.modules makes the import raise ImportError, as when Pillow is not installed.
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(UsageError, match=r'Pillow, which is not installed; install it with pip install "crsam\[images\]"'):
        load_imagefolder(folder)


def test_without_data_dir():
    with pytest.raises(UsageError, match=r"--data imagefolder needs --data-dir: pass the folder laid out as ROOT/train"):
        load_imagefolder(None)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_invalid_image_size(folder, size):
    with pytest.raises(ValueError, match=rf"image_size must be a positive int, got {size!r}"):
        load_imagefolder(folder, image_size=size)


# ---------------------------------------------------------------------------- training options


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": "cifar10", "data_dir": None, "image_size": 16},
         r"--image-size applies to --data imagefolder only; drop it for --data cifar10"),
        ({"image_size": 0}, r"--image-size 0 is below 1; pass a whole number such as 32"),
        ({"model": "vit", "lr": 0.01, "width": None, "image_size": 30},
         r"--image-size 30 is not a multiple of the ViT's 4-pixel patches; pass a size such as 32 or 64"),
        ({"image_size": 16, "cutout": 17}, r"--cutout 17 is larger than the 16-pixel images; pass a side such as 8"),
        ({"model": "mlp", "width": None}, r"--model mlp takes MNIST-1D sequences, not the images of --data imagefolder"),
    ],
)
def test_invalid_training_options(changes, message):
    with pytest.raises(UsageError, match=message):
        resolve_options({**TINY_RUN, **changes})


def test_image_size_defaults_to_32():
    assert resolve_options(TINY_RUN)["image_size"] == 32
    assert resolve_options({**TINY_RUN, "data": "cifar10"})["image_size"] is None


def test_vit_built_for_image_size(folder):
    config = resolve_options({**TINY_RUN, "model": "vit", "lr": 0.01, "width": None, "image_size": 16})
    data = load_imagefolder(folder, image_size=16)
    model = build_run_model(config, data)
    assert model.image_size == 16
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


# ---------------------------------------------------------------------------- training end to end


def test_cli_trains_one_epoch(folder, tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["train", "--data", "imagefolder", "--data-dir", str(folder), "--model", "resnet18",
                   "--width", "2", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", str(out),
                   "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert status == 0
    assert summary["epochs_completed"] == 1
    assert summary["config"]["image_size"] == 32

    data = load_imagefolder(folder)
    config = json.loads((out / "config.json").read_text())
    assert config["data_sha256"] == data.sha256
    assert config["n_train"] == 12
    assert config["n_test"] == 6
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["data"]["num_classes"] == 3
    assert payload["model"]["classifier.weight"].shape == (3, 16)

    # restore_run, behind bound, curvature and verify, rebuilds the model and the normalized images.
    restored = restore_run(out / "checkpoint.pt")
    assert restored.data.num_classes == 3
    assert restored.data.x_train.shape == (12, 3, 32, 32)
    assert torch.equal(restored.data.y_test, data.y_test)

    status = main(["bound", str(out / "checkpoint.pt"), "--mc-samples", "5", "--json"])
    bound = json.loads(capsys.readouterr().out)
    assert status == 0
    assert bound["n_train"] == 12
    status = main(["curvature", str(out / "checkpoint.pt"), "--probes", "3", "--split", "test", "--json"])
    curvature = json.loads(capsys.readouterr().out)
    assert status == 0
    assert curvature["split"] == "test"


def test_resume_exact(folder, tmp_path):
    run = {**TINY_RUN, "data_dir": str(folder), "cutout": 8, "image_size": 16}
    train(run, out=tmp_path / "whole", progress=False)
    train(run, out=tmp_path / "parts", progress=False, stop_after_epoch=1)
    train({}, out=tmp_path / "parts", resume=True, progress=False)
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    parts = load_checkpoint(tmp_path / "parts" / "checkpoint.pt")
    for key, value in whole["model"].items():
        assert torch.equal(parts["model"][key], value), key
    for key in ("torch", "data_order", "augmentation"):
        assert torch.equal(parts["rng"][key], whole["rng"][key]), key


def test_changed_image_fails_restore(tmp_path):
    root = write_tiny_folder(tmp_path / "images")
    train({**TINY_RUN, "data_dir": str(root), "epochs": 1}, out=tmp_path / "run", progress=False)
    Image.new("RGB", (WIDTH, HEIGHT), (1, 2, 3)).save(root / "val" / "ant" / "0.png")
    version = re.escape(Image.__version__)
    with pytest.raises(UsageError, match=r"have SHA-256 .*; pass --data-dir with the unchanged folder the run trained "
                                         rf"on, and decode it with Pillow {version} as the run did \(this is Pillow "
                                         rf"{version}\)"):
        restore_run(tmp_path / "run" / "checkpoint.pt")
