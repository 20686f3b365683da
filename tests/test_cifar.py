"""CIFAR reading, checksum and format checks, restricted unpickling and batched augmentation.

Every test writes its own tiny CIFAR folders and archives, so none needs the real data sets.
"""

import io
import pickle
import pickletools
import struct
import tarfile

import numpy as np
import pytest
import torch

from crsam import cifar
from crsam.errors import UsageError

CIFAR10 = cifar.CIFAR_SPECS["cifar10"]


def random_split(seed, n_train=10, n_test=4, num_classes=10):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8),
        "y_train": rng.integers(0, num_classes, n_train),
        "x_test": rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8),
        "y_test": rng.integers(0, num_classes, n_test),
    }


def load_tiny(name, data_dir, **kwargs):
    return cifar.load_cifar(name, data_dir, expected_sizes=None, **kwargs)


# --------------------------------------------------------------------------------------------
# Byte streams as Python 2's cPickle wrote the official files, built opcode by opcode
# --------------------------------------------------------------------------------------------


def py2_string(value: bytes) -> bytes:
    """SHORT_BINSTRING: a Python 2 str of fewer than 256 bytes."""
    return b"U" + bytes([len(value)]) + value


def py2_uint8_rows(rows: bytes, num_rows: int) -> bytes:
    """A numpy 1.x uint8 array of shape (num_rows, 3072), as ndarray.__reduce__ pickled it."""
    return b"".join([
        b"cnumpy.core.multiarray\n_reconstruct\n",  # GLOBAL
        b"cnumpy\nndarray\n",  # GLOBAL
        b"K\x00\x85",  # (0,)
        py2_string(b"b"),
        b"\x87R",  # TUPLE3, REDUCE: _reconstruct(ndarray, (0,), 'b')
        b"(K\x01",  # MARK, state version 1
        b"M" + struct.pack("<H", num_rows) + b"M\x00\x0c\x86",  # shape (num_rows, 3072)
        b"cnumpy\ndtype\n" + py2_string(b"u1") + b"K\x00K\x01\x87R",  # dtype('u1', 0, 1)
        b"(K\x03" + py2_string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",  # dtype state, BUILD
        b"\x89",  # NEWFALSE: C order
        b"T" + struct.pack("<i", len(rows)) + rows,  # BINSTRING raw pixels
        b"tb",  # TUPLE, BUILD
    ])


def py2_batch(rows: bytes, labels: list[int]) -> bytes:
    """A CIFAR-10 batch dict {'data': array, 'labels': [...]} as a protocol 2 stream."""
    label_items = b"".join(b"K" + bytes([label]) for label in labels)
    return b"".join([
        b"\x80\x02}(",  # PROTO 2, EMPTY_DICT, MARK
        py2_string(b"data") + py2_uint8_rows(rows, len(labels)),
        py2_string(b"labels") + b"](" + label_items + b"e",  # list via MARK ... APPENDS
        b"u.",  # SETITEMS, STOP
    ])


def py2_meta(names: list[bytes]) -> bytes:
    items = b"".join(py2_string(name) for name in names)
    return b"\x80\x02}(" + py2_string(b"label_names") + b"](" + items + b"eu."


def test_py2_stream_matches_plain_pickle():
    # The hand-built stream must be what pickle itself reads as the official layout.
    rows = bytes(range(256)) * 12
    batch = pickle.loads(py2_batch(rows, [7]), encoding="bytes")
    assert set(batch) == {b"data", b"labels"}
    assert batch[b"data"].dtype == np.uint8
    assert batch[b"data"].shape == (1, 3072)
    assert batch[b"labels"] == [7]


def test_reads_python2_folder(tmp_path):
    folder = tmp_path / CIFAR10.folder
    folder.mkdir()
    # Pixel k of each row is k % 251, so every (channel, row, column) has a known value.
    rows = bytes(k % 251 for k in range(3072))
    for file_name in (*CIFAR10.train_files, *CIFAR10.test_files):
        (folder / file_name).write_bytes(py2_batch(rows, [3]))
    (folder / CIFAR10.meta_file).write_bytes(py2_meta([f"c{i}".encode() for i in range(10)]))

    data = load_tiny("cifar10", tmp_path)
    channel, row, column = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    expected = ((channel * 1024 + row * 32 + column) % 251).to(torch.uint8)
    assert data.x_train.shape == (5, 3, 32, 32)
    assert torch.equal(data.x_train[0], expected)
    assert data.y_train.tolist() == [3] * 5
    assert data.class_names[9] == "c9"


# --------------------------------------------------------------------------------------------
# Layout, archive and checksum
# --------------------------------------------------------------------------------------------


def test_writer_emits_official_format(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(0))
    raw = (tmp_path / CIFAR10.folder / "data_batch_1").read_bytes()
    opcodes = [opcode.name for opcode, _, _ in pickletools.genops(raw)]
    globals_used = {argument for opcode, argument, _ in pickletools.genops(raw) if opcode.name == "GLOBAL"}
    assert raw[:2] == b"\x80\x02"
    assert globals_used == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert "BINUNICODE" not in opcodes
    assert "SHORT_BINBYTES" not in opcodes


def test_loads_cifar10_folder(tmp_path):
    split = random_split(1)
    cifar.write_cifar_folder(tmp_path, "cifar10", **split)
    data = load_tiny("cifar10", tmp_path)
    assert data.x_train.dtype == torch.uint8
    assert data.y_train.dtype == torch.int64
    assert torch.equal(data.x_train, torch.from_numpy(split["x_train"]))
    assert torch.equal(data.y_test, torch.from_numpy(split["y_test"]))
    assert data.num_classes == 10
    assert data.source["kind"] == "folder"


def test_loads_folder_itself(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(2))
    from_parent = load_tiny("cifar10", tmp_path)
    from_folder = load_tiny("cifar10", tmp_path / CIFAR10.folder)
    assert from_parent.sha256 == from_folder.sha256


def test_loads_cifar100_fine_labels(tmp_path):
    split = random_split(3, num_classes=100)
    cifar.write_cifar_folder(tmp_path, "cifar100", **split)
    data = load_tiny("cifar100", tmp_path)
    assert data.num_classes == 100
    assert len(data.class_names) == 100
    assert torch.equal(data.y_train, torch.from_numpy(split["y_train"]))


def test_archive_with_matching_md5(tmp_path):
    split = random_split(4)
    md5 = cifar.write_cifar_folder(tmp_path, "cifar10", extracted=False, archive=True, **split)
    data = load_tiny("cifar10", tmp_path, archive_md5=md5)
    assert data.source == {"kind": "archive", "path": str(tmp_path / CIFAR10.archive), "md5": md5}
    assert torch.equal(data.x_train, torch.from_numpy(split["x_train"]))


def test_archive_and_folder_hash_equal(tmp_path):
    md5 = cifar.write_cifar_folder(tmp_path, "cifar10", archive=True, **random_split(5))
    from_archive = load_tiny("cifar10", tmp_path, archive_md5=md5)
    (tmp_path / CIFAR10.archive).unlink()
    from_folder = load_tiny("cifar10", tmp_path)
    assert from_archive.sha256 == from_folder.sha256


def test_archive_beside_folder_is_checked(tmp_path):
    # Given the extracted folder, the archive in its parent is still found and checked.
    md5 = cifar.write_cifar_folder(tmp_path, "cifar10", archive=True, **random_split(6))
    data = load_tiny("cifar10", tmp_path / CIFAR10.folder, archive_md5=md5)
    assert data.source["kind"] == "archive"


def test_archive_default_md5_is_official(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", archive=True, **random_split(7))
    with pytest.raises(UsageError, match="expected c58f30108f718f92721af3b95e74349a"):
        load_tiny("cifar10", tmp_path)


def test_corrupted_archive_rejected(tmp_path):
    md5 = cifar.write_cifar_folder(tmp_path, "cifar10", extracted=False, archive=True, **random_split(8))
    archive = tmp_path / CIFAR10.archive
    contents = bytearray(archive.read_bytes())
    contents[len(contents) // 2] ^= 0xFF
    archive.write_bytes(bytes(contents))
    with pytest.raises(UsageError, match=rf"has MD5 [0-9a-f]{{32}}, expected {md5}.*kriz/cifar.html"):
        load_tiny("cifar10", tmp_path, archive_md5=md5)


def test_archive_missing_member(tmp_path):
    archive = tmp_path / CIFAR10.archive
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(f"{CIFAR10.folder}/data_batch_1")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UsageError, match="no member 'cifar-10-batches-py/data_batch_2'"):
        load_tiny("cifar10", tmp_path, archive_md5=cifar.md5_of_file(archive))


def test_missing_folder_names_layout(tmp_path):
    with pytest.raises(UsageError, match=r"not found .*no such folder.*data_batch_1.*batches\.meta.*kriz/cifar\.html"):
        cifar.load_cifar("cifar10", tmp_path)


def test_missing_file_is_named(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(9))
    (tmp_path / CIFAR10.folder / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="missing data_batch_3"):
        load_tiny("cifar10", tmp_path)


def test_data_dir_required():
    with pytest.raises(UsageError, match="needs --data-dir"):
        cifar.load_cifar("cifar10", None)


def test_data_dir_not_a_folder(tmp_path):
    with pytest.raises(UsageError, match="is not an existing folder"):
        cifar.load_cifar("cifar10", tmp_path / "absent")


def test_unknown_name():
    with pytest.raises(UsageError, match="'cifar20' is unknown; choose one of cifar10, cifar100"):
        cifar.load_cifar("cifar20", ".")


def test_official_sizes_required_by_default(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(10))
    with pytest.raises(UsageError, match="has 10 training and 4 test images, expected 50000 and 10000"):
        cifar.load_cifar("cifar10", tmp_path)


# --------------------------------------------------------------------------------------------
# Batch contents
# --------------------------------------------------------------------------------------------


def write_batch(tmp_path, file_name, batch):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(11))
    (tmp_path / CIFAR10.folder / file_name).write_bytes(cifar._python2_pickle_bytes(batch))


def test_label_out_of_range(tmp_path):
    write_batch(tmp_path, "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    with pytest.raises(UsageError, match=r"test_batch.*labels range over \[0, 10\], outside \[0, 9\]"):
        load_tiny("cifar10", tmp_path)


def test_wrong_pixel_dtype(tmp_path):
    write_batch(tmp_path, "test_batch", {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]})
    with pytest.raises(UsageError, match=r"float32 array of shape \(2, 3072\), expected uint8"):
        load_tiny("cifar10", tmp_path)


def test_wrong_row_length(tmp_path):
    write_batch(tmp_path, "test_batch", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    with pytest.raises(UsageError, match=r"shape \(2, 1024\), expected uint8 of shape \(N, 3072\)"):
        load_tiny("cifar10", tmp_path)


def test_label_count_mismatch(tmp_path):
    write_batch(tmp_path, "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(UsageError, match="1 labels for 2 images"):
        load_tiny("cifar10", tmp_path)


def test_missing_key(tmp_path):
    write_batch(tmp_path, "test_batch", {b"data": np.zeros((2, 3072), np.uint8)})
    with pytest.raises(UsageError, match="has no key b'labels'"):
        load_tiny("cifar10", tmp_path)


def test_meta_without_class_names(tmp_path):
    write_batch(tmp_path, "batches.meta", {b"num_vis": 3072})
    with pytest.raises(UsageError, match="does not list 10 class names"):
        load_tiny("cifar10", tmp_path)


def test_truncated_pickle(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(12))
    path = tmp_path / CIFAR10.folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UsageError, match="data_batch_2.*not a readable pickle"):
        load_tiny("cifar10", tmp_path)


# --------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------


def test_os_system_rejected(tmp_path):
    marker = tmp_path / "executed"
    # Protocol 0: os.system("touch <marker>") through GLOBAL and REDUCE.
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(13))
    (tmp_path / CIFAR10.folder / "data_batch_1").write_bytes(payload)
    with pytest.raises(UsageError, match="data_batch_1.*global os.system is forbidden"):
        load_tiny("cifar10", tmp_path)
    assert not marker.exists()


class CallsEval:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_builtins_eval_rejected():
    payload = pickle.dumps(CallsEval(), protocol=4)
    with pytest.raises(UsageError, match="global builtins.eval is forbidden"):
        cifar.load_restricted_pickle(payload, "payload")


def test_direct_ndarray_call_rejected():
    # numpy.ndarray((10**12,)) would allocate a terabyte; only _reconstruct may receive the class.
    payload = b"\x80\x02cnumpy\nndarray\n" + pickle.dumps(10**12, protocol=2)[2:-1] + b"\x85R."
    with pytest.raises(UsageError, match="numpy.ndarray is called directly"):
        cifar.load_restricted_pickle(payload, "payload")


def test_object_array_rejected():
    payload = cifar._python2_pickle_bytes(np.array([1, None], dtype=object))
    with pytest.raises(UsageError, match="dtype\\('O'\\) is not allowed"):
        cifar.load_restricted_pickle(payload, "payload")


def test_python3_bytes_rejected():
    # Python 3 writes bytes at protocol 2 through _codecs.encode, which the official files never use.
    payload = pickle.dumps({b"data": b"x"}, protocol=2)
    with pytest.raises(UsageError, match="global _codecs.encode is forbidden"):
        cifar.load_restricted_pickle(payload, "payload")


def test_object_dtype_spec_rejected():
    payload = b"\x80\x02cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R."
    with pytest.raises(UsageError, match="dtype\\('O'\\) is not allowed"):
        cifar.load_restricted_pickle(payload, "payload")


# --------------------------------------------------------------------------------------------
# Statistics and hash
# --------------------------------------------------------------------------------------------


def test_mean_std_match_float64():
    images = torch.from_numpy(random_split(14, n_train=50)["x_train"])
    mean, std = cifar.channel_mean_std(images, chunk_size=7)
    reference = images.double().permute(1, 0, 2, 3).reshape(3, -1) / 255.0
    # Both are exact up to float64 round-off of sums over 51200 values (about 1e-16 relative each).
    assert np.allclose(mean, reference.mean(dim=1).numpy(), rtol=0, atol=1e-12)
    assert np.allclose(std, reference.std(dim=1, correction=0).numpy(), rtol=0, atol=1e-12)


def test_hash_changes_with_one_pixel(tmp_path):
    split = random_split(15)
    cifar.write_cifar_folder(tmp_path / "a", "cifar10", **split)
    split["x_train"][3, 1, 2, 3] ^= 1
    cifar.write_cifar_folder(tmp_path / "b", "cifar10", **split)
    assert load_tiny("cifar10", tmp_path / "a").sha256 != load_tiny("cifar10", tmp_path / "b").sha256


def test_describe_is_plain_data(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(16))
    description = load_tiny("cifar10", tmp_path).describe()
    assert description["n_train"] == 10
    assert description["input_shape"] == [3, 32, 32]
    assert len(description["mean"]) == 3


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def distinct_images(batch, channels=2, size=6):
    # Values 1..1000 are never equal to the zero padding and rarely to each other.
    return torch.randint(1, 1001, (batch, channels, size, size), generator=seeded(99))


def test_crop_keeps_shape_and_dtype():
    images = torch.from_numpy(random_split(17)["x_train"])
    cropped = cifar.random_crop(images, seeded(0), padding=4)
    assert cropped.shape == images.shape
    assert cropped.dtype == torch.uint8


def test_crop_is_padded_window():
    images = distinct_images(2000)
    padding = 2
    cropped = cifar.random_crop(images, seeded(1), padding=padding)
    padded = torch.nn.functional.pad(images, (padding,) * 4)

    # matches[o, n]: output n equals the window of padded input n at offset o.
    matches = torch.stack([
        (cropped == padded[:, :, dy:dy + 6, dx:dx + 6]).all(dim=(1, 2, 3))
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ])
    assert bool((matches.sum(dim=0) == 1).all())
    # With 2000 draws over 25 offsets, missing one has probability below 25 * (24/25)**2000 ~ 1e-34.
    assert bool(matches.any(dim=1).all())


def test_crop_without_padding_is_identity():
    images = distinct_images(4)
    assert torch.equal(cifar.random_crop(images, seeded(2), padding=0), images)


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_flip_extreme_probability(probability):
    images = distinct_images(50)
    flipped = cifar.random_horizontal_flip(images, seeded(3), probability=probability)
    expected = images.flip(-1) if probability == 1.0 else images
    assert torch.equal(flipped, expected)


def test_flip_frequency():
    n = 20000
    images = distinct_images(n, channels=1, size=4)
    flipped = cifar.random_horizontal_flip(images, seeded(4), probability=0.3)
    is_flipped = (flipped == images.flip(-1)).all(dim=(1, 2, 3))
    is_kept = (flipped == images).all(dim=(1, 2, 3))
    assert bool((is_flipped ^ is_kept).all())
    # Binomial(20000, 0.3): standard deviation 64.8; 5 standard deviations fail with probability 6e-7.
    assert abs(int(is_flipped.sum()) - 0.3 * n) < 5 * (n * 0.3 * 0.7) ** 0.5


@pytest.mark.parametrize(
    ("centre", "size", "area"),
    [
        ((16, 16), 16, 16 * 16),  # fully inside: rows and columns 8..23
        ((0, 0), 16, 8 * 8),  # corner: rows and columns 0..7
        ((31, 31), 16, 9 * 9),  # far corner: rows and columns 23..31
        ((0, 16), 16, 8 * 16),  # top edge
        ((0, 0), 5, 3 * 3),  # odd side: rows -2..2 clipped to 0..2
        ((10, 20), 1, 1),
    ],
)
def test_cutout_mask_area(centre, size, area):
    mask = cifar._square_mask(torch.tensor([centre[0]]), torch.tensor([centre[1]]), size, 32, 32)
    assert int(mask.sum()) == area


def test_cutout_zeroes_clipped_square():
    images = torch.ones(500, 3, 32, 32)
    out = cifar.cutout(images, seeded(5), size=16)
    zero = out == 0
    assert bool((zero.all(dim=1) | (~zero).all(dim=1)).all())  # every channel alike

    zero = zero[:, 0]
    rows = zero.any(dim=2)
    cols = zero.any(dim=1)
    heights = rows.sum(dim=1)
    widths = cols.sum(dim=1)
    # The zeros fill exactly the rectangle spanned by their rows and columns.
    assert torch.equal(zero.sum(dim=(1, 2)), heights * widths)
    # A centre inside the image keeps at least 8 of the 16 rows and columns.
    assert int(heights.min()) >= 8
    assert int(heights.max()) == 16
    # Squares that touch neither the top nor the bottom border keep all 16 rows.
    inside = ~rows[:, 0] & ~rows[:, -1]
    assert bool((heights[inside] == 16).all())
    inside = ~cols[:, 0] & ~cols[:, -1]
    assert bool((widths[inside] == 16).all())


def test_cutout_size_zero_is_identity():
    images = torch.ones(3, 3, 32, 32)
    assert torch.equal(cifar.cutout(images, seeded(6), size=0), images)


def test_normalize_formula():
    images = torch.from_numpy(random_split(18)["x_train"])
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = cifar.normalize(images, mean, std)
    expected = (images.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(std).double().view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    # float32 round-off on values of magnitude below 5.
    assert torch.allclose(out.double(), expected, rtol=0, atol=1e-5)


def test_normalize_standardizes_train_set(tmp_path):
    cifar.write_cifar_folder(tmp_path, "cifar10", **random_split(19, n_train=40))
    data = load_tiny("cifar10", tmp_path)
    out = cifar.normalize(data.x_train, data.mean, data.std).double()
    # float32 round-off summed over 40960 pixels per channel.
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5)


def test_normalize_rejects_float():
    with pytest.raises(TypeError, match="expects uint8 images"):
        cifar.normalize(torch.zeros(1, 3, 2, 2), (0, 0, 0), (1, 1, 1))


def test_augment_deterministic():
    images = torch.from_numpy(random_split(20, n_train=64)["x_train"])
    kwargs = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    first = cifar.augment(images, seeded(7), **kwargs)
    again = cifar.augment(images, seeded(7), **kwargs)
    other = cifar.augment(images, seeded(8), **kwargs)
    assert first.shape == (64, 3, 32, 32)
    assert first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: cifar.random_crop(torch.zeros(3, 32, 32), g), r"shape \(N, C, H, W\), got \(3, 32, 32\)"),
        (lambda g: cifar.random_crop(torch.zeros(1, 3, 4, 4), g, padding=-1), "padding must be a non-negative int, got -1"),
        (lambda g: cifar.random_horizontal_flip(torch.zeros(1, 3, 4, 4), g, probability=1.5), r"probability must be in \[0, 1\], got 1.5"),
        (lambda g: cifar.cutout(torch.zeros(1, 3, 4, 4), g, size=2.5), "size must be a non-negative int, got 2.5"),
        (lambda g: cifar.normalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (0, 0), (1, 1)), "one value per channel"),
        (lambda g: cifar.normalize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (0, 0, 0), (1, 0, 1)), "std must be positive"),
    ],
)
def test_augmentation_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(seeded(0))
