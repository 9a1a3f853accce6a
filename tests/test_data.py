"""Tests of grafting.data: generated datasets in the real formats, CIFAR pipelines, ImageNet folders."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from grafting.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EpochLoader,
    cifar_loaders,
    epoch_seed,
    imagenet_loaders,
    load_cifar,
    random_crop_flip,
    write_fake_cifar,
    write_fake_imagefolder,
)
from grafting.data.fake import MARKER_NAME
from grafting.errors import DatasetNotFoundError, GraftingError

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, warning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CPU = torch.device("cpu")
PIPELINES = ("tensor", "torchvision")
TRAIN_SIZE, TEST_SIZE = 300, 130  # odd sizes, so the last batches are partial


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The batches here are small: one intra-op thread is faster than two that wait on each other on a
    busy 2-core machine, and leaves the other core to DataLoader workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("cifar10"), 10, train_size=TRAIN_SIZE, test_size=TEST_SIZE)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    return write_fake_cifar(
        tmp_path_factory.mktemp("cifar100"), 100, train_size=TRAIN_SIZE, test_size=TEST_SIZE, seed=3
    )


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_fake_imagefolder(
        tmp_path_factory.mktemp("imagenet"), num_classes=3, train_per_class=10, val_per_class=5, image_size=40
    )


def collect(loader: EpochLoader, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of one epoch, concatenated."""
    loader.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def denormalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Float images back to 0..255 values (exact integers up to float error)."""
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (images.double() * std_t + mean_t) * 255


# ----------------------------------------------------------------------------------------------
# Generated CIFAR in the real format


def test_fake_cifar10_has_the_real_file_layout(cifar10):
    folder = cifar10 / "cifar-10-batches-py"
    names = sorted(path.name for path in folder.iterdir())
    assert names == [
        "batches.meta",
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ]
    assert "not the real dataset" in (cifar10 / MARKER_NAME).read_text()
    sizes = []
    for name in names[1:]:
        with open(folder / name, "rb") as handle:
            entry = pickle.load(handle, encoding="bytes")  # the recipe on the CIFAR web page
        assert set(entry) == {b"data", b"labels", b"batch_label", b"filenames"}
        assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (len(entry[b"labels"]), 3072)
        assert all(isinstance(name, bytes) for name in entry[b"filenames"])
        assert all(0 <= label < 10 for label in entry[b"labels"])
        sizes.append(len(entry[b"labels"]))
    assert sizes[:5] == [60] * 5 and sizes[5] == TEST_SIZE
    with open(folder / "batches.meta", "rb") as handle:
        assert len(pickle.load(handle, encoding="bytes")[b"label_names"]) == 10
    with open(folder / "batches.meta", "rb") as handle:
        assert len(pickle.load(handle, encoding="latin1")["label_names"]) == 10  # torchvision's reading


def test_fake_cifar100_has_the_real_file_layout(cifar100):
    folder = cifar100 / "cifar-100-python"
    assert sorted(path.name for path in folder.iterdir()) == ["meta", "test", "train"]
    with open(folder / "train", "rb") as handle:
        entry = pickle.load(handle, encoding="bytes")
    assert set(entry) == {b"data", b"fine_labels", b"coarse_labels", b"batch_label", b"filenames"}
    assert entry[b"data"].shape == (TRAIN_SIZE, 3072)
    assert [fine // 5 for fine in entry[b"fine_labels"]] == entry[b"coarse_labels"]
    assert max(entry[b"fine_labels"]) == 99  # 300 balanced labels cover all 100 classes
    with open(folder / "meta", "rb") as handle:
        meta = pickle.load(handle, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20


@pytest.mark.parametrize("num_classes", [10, 100])
def test_load_cifar_reads_the_generated_files_as_row_major_rgb_planes(cifar10, cifar100, num_classes):
    root = cifar10 if num_classes == 10 else cifar100
    train_set, test_set = load_cifar(root, num_classes)
    assert (len(train_set), len(test_set), len(train_set.classes)) == (TRAIN_SIZE, TEST_SIZE, num_classes)
    file_name = "cifar-10-batches-py/test_batch" if num_classes == 10 else "cifar-100-python/test"
    with open(root / file_name, "rb") as handle:
        rows = pickle.load(handle, encoding="bytes")[b"data"]
    np.testing.assert_array_equal(test_set.data, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_load_cifar_reads_what_torchvisions_reader_reads(cifar10, cifar100, num_classes, monkeypatch):
    import torchvision
    import torchvision.datasets.cifar as torchvision_cifar

    root = cifar10 if num_classes == 10 else cifar100
    reader = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    monkeypatch.setattr(torchvision_cifar, "check_integrity", lambda *args: True)  # generated files: other md5 sums
    for train, ours in zip((True, False), load_cifar(root, num_classes)):
        theirs = reader(str(root), train=train)
        np.testing.assert_array_equal(ours.data, theirs.data)
        assert ours.targets == theirs.targets and ours.classes == theirs.classes and len(ours) == len(theirs)
        image, label = ours[3]
        their_image, their_label = theirs[3]
        assert label == their_label and image.mode == their_image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(their_image))


def test_generated_cifar_is_learnable(cifar10):
    # A nearest-class-mean classifier on raw pixels must beat chance (10%) by far.
    train_set, test_set = load_cifar(cifar10, 10)
    train_x = train_set.data.reshape(len(train_set), -1).astype(np.float64)
    test_x = test_set.data.reshape(len(test_set), -1).astype(np.float64)
    train_y, test_y = np.array(train_set.targets), np.array(test_set.targets)
    means = np.stack([train_x[train_y == label].mean(0) for label in range(10)])
    predicted = ((test_x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test_y).mean() > 0.6


def test_generated_cifar_depends_on_the_seed_only(tmp_path):
    first = write_fake_cifar(tmp_path / "a", 10, train_size=20, test_size=10, seed=5)
    second = write_fake_cifar(tmp_path / "b", 10, train_size=20, test_size=10, seed=5)
    other = write_fake_cifar(tmp_path / "c", 10, train_size=20, test_size=10, seed=6)
    data = [load_cifar(root, 10)[0].data for root in (first, second, other)]
    np.testing.assert_array_equal(data[0], data[1])
    assert not np.array_equal(data[0], data[2])


@pytest.mark.parametrize("num_classes", [10, 100])
def test_missing_cifar_names_the_folder_and_download(tmp_path, num_classes):
    with pytest.raises(DatasetNotFoundError) as caught:
        load_cifar(tmp_path / "nowhere", num_classes)
    message = str(caught.value)
    assert "\n" not in message
    assert f"CIFAR-{num_classes} not found in {(tmp_path / 'nowhere').resolve()}" in message
    assert "--download" in message and "--data" in message
    expected_folder = "cifar-10-batches-py/" if num_classes == 10 else "cifar-100-python/"
    assert expected_folder in message


def test_incomplete_or_damaged_cifar_is_reported(tmp_path):
    root = write_fake_cifar(tmp_path, 10, train_size=20, test_size=10)
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(DatasetNotFoundError, match="unreadable.*--download"):
        load_cifar(root, 10)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="not found"):
        load_cifar(root, 10)


def test_present_files_are_neither_hashed_nor_downloaded_and_failed_downloads_are_reported(
    cifar10, tmp_path, monkeypatch
):
    import urllib.error

    import torchvision.datasets.utils as torchvision_utils

    def forbidden(*args, **kwargs):
        raise AssertionError("must not be called")

    monkeypatch.setattr(torchvision_utils, "check_integrity", forbidden)  # the md5 check
    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", forbidden)
    assert len(load_cifar(cifar10, 10, download=True)[0]) == TRAIN_SIZE

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="could not download CIFAR-100 into .*no network.*by hand"):
        load_cifar(tmp_path, 100, download=True)


def test_bad_arguments_raise_grafting_errors(cifar10):
    with pytest.raises(GraftingError, match="--cifar 10 or --cifar 100"):
        load_cifar(cifar10, 7)
    with pytest.raises(GraftingError, match="--pipeline"):
        cifar_loaders(cifar10, 10, device=CPU, pipeline="dali")


# ----------------------------------------------------------------------------------------------
# The batched augmentation of the tensor pipeline


def coordinate_images(count: int) -> torch.Tensor:
    """Channel 0 holds row + 1, channel 1 column + 1: a crop's position can be read back from it."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    columns = torch.arange(1, 33, dtype=torch.uint8).view(1, 32).expand(32, 32)
    return torch.stack([rows, columns]).unsqueeze(0).expand(count, 2, 32, 32).contiguous()


def read_back_crops(crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flipped) of crops of :func:`coordinate_images`; the centre pixel is never padding."""
    centre_row = crops[:, 0, 16, 16].long()  # = 16 + top - 4 + 1
    flipped = crops[:, 1, 16, 17] < crops[:, 1, 16, 16]
    centre_column = crops[:, 1, 16, 16].long()  # unflipped: 16 + left - 3; flipped: 31 - 16 + left - 3
    left = torch.where(flipped, centre_column - 12, centre_column - 13)
    return centre_row - 13, left, flipped


def test_random_crop_offsets_are_uniform_and_half_the_images_flipped():
    generator = torch.Generator().manual_seed(1234)
    tops, lefts, flips = [], [], []
    for _ in range(4):
        top, left, flipped = read_back_crops(random_crop_flip(coordinate_images(5000), generator))
        tops.append(top), lefts.append(left), flips.append(flipped)
    top, left, flipped = torch.cat(tops), torch.cat(lefts), torch.cat(flips)
    draws = len(top)
    # Pearson's chi-square against uniform over 0..8, 8 degrees of freedom; 26.12 is its 0.999 quantile.
    for offsets in (top, left):
        assert offsets.min() == 0 and offsets.max() == 8
        counts = torch.bincount(offsets, minlength=9).double()
        chi_square = ((counts - draws / 9) ** 2 / (draws / 9)).sum().item()
        assert chi_square < 26.12, counts
    assert abs(flipped.double().mean().item() - 0.5) < 0.015
    # Top, left and flip are independent draws, not one shared offset.
    assert (top == left).double().mean().item() < 0.2


def test_random_crop_matches_torchvision_pad_crop_flip_for_the_same_offsets():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    crops = random_crop_flip(images, torch.Generator().manual_seed(99))
    # The same generator state draws the same offsets whatever the content, so read them back.
    top, left, flipped = read_back_crops(random_crop_flip(coordinate_images(64), torch.Generator().manual_seed(99)))
    for index in range(64):
        expected = TF.crop(F.pad(images[index], (4, 4, 4, 4)), int(top[index]), int(left[index]), 32, 32)
        if flipped[index]:
            expected = TF.horizontal_flip(expected)
        assert torch.equal(crops[index], expected), index


# ----------------------------------------------------------------------------------------------
# The CIFAR loaders


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_loaders_yield_normalised_device_batches(cifar10, cifar100, pipeline, num_classes):
    root = cifar10 if num_classes == 10 else cifar100
    train, test, used = cifar_loaders(
        root, num_classes, batch_size=64, test_batch_size=50, device=CPU, pipeline=pipeline, workers=0
    )
    assert used == pipeline
    assert isinstance(train, EpochLoader) and isinstance(test, EpochLoader)
    assert (len(train), len(test)) == (math.ceil(TRAIN_SIZE / 64), math.ceil(TEST_SIZE / 50))
    train.set_epoch(0)
    sizes = [len(images) for images, _ in train]
    assert sizes == [64, 64, 64, 64, TRAIN_SIZE - 256]
    images, labels = collect(train, 0)
    assert images.dtype == torch.float32 and images.shape == (TRAIN_SIZE, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < num_classes
    # Shuffled, but every training image exactly once per epoch.
    train_set, test_set = load_cifar(root, num_classes)
    assert sorted(labels.tolist()) == sorted(train_set.targets)
    assert labels.tolist() != train_set.targets
    # Augmented pixels are still (zero-padded) pixels: normalisation inverts to integers 0..255.
    pixels = denormalise(images, CIFAR_MEAN, CIFAR_STD)
    assert torch.allclose(pixels, pixels.round(), atol=1e-3) and pixels.min() > -1e-3 and pixels.max() < 255.001
    # The test split comes in file order.
    assert collect(test, 0)[1].tolist() == test_set.targets


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_test_images_are_normalised_like_by_hand(cifar10, pipeline):
    _, test, _ = cifar_loaders(cifar10, 10, device=CPU, pipeline=pipeline, workers=0)
    images, _ = collect(test, 0)
    raw = load_cifar(cifar10, 10)[1].data.astype(np.float64) / 255  # (N, 32, 32, 3)
    by_hand = (raw - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    np.testing.assert_allclose(images.permute(0, 2, 3, 1).double().numpy(), by_hand, atol=1e-5)
    np.testing.assert_allclose(images.double().mean((0, 2, 3)).numpy(), by_hand.mean((0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(images.double().std((0, 2, 3)).numpy(), by_hand.std((0, 1, 2), ddof=1), atol=1e-6)


def test_both_pipelines_give_the_same_test_batches(cifar10):
    loaders = [
        cifar_loaders(cifar10, 10, test_batch_size=40, device=CPU, pipeline=pipeline, workers=0)[1]
        for pipeline in PIPELINES
    ]
    for loader in loaders:
        loader.set_epoch(3)
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == math.ceil(TEST_SIZE / 40)
    for (tensor_images, tensor_labels), (tv_images, tv_labels) in zip(*batches):
        assert torch.equal(tensor_labels, tv_labels)
        torch.testing.assert_close(tensor_images, tv_images, rtol=0, atol=1e-6)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_train_batches_depend_only_on_seed_and_epoch(cifar10, pipeline):
    def loader(seed):
        return cifar_loaders(cifar10, 10, batch_size=100, device=CPU, pipeline=pipeline, workers=0, seed=seed)[0]

    running = loader(seed=1)
    epoch0, epoch1, epoch0_again = collect(running, 0), collect(running, 1), collect(running, 0)
    assert torch.equal(epoch0[0], epoch0_again[0]) and torch.equal(epoch0[1], epoch0_again[1])
    assert not torch.equal(epoch0[1], epoch1[1])  # another order
    # A resumed run builds a new loader and starts at epoch 1: it must see the same batches.
    resumed = collect(loader(seed=1), 1)
    assert torch.equal(epoch1[0], resumed[0]) and torch.equal(epoch1[1], resumed[1])
    assert not torch.equal(collect(loader(seed=2), 1)[1], epoch1[1])


def test_loaders_leave_the_global_random_stream_alone(cifar10):
    for pipeline in PIPELINES:
        train, _, _ = cifar_loaders(cifar10, 10, device=CPU, pipeline=pipeline, workers=0)
        torch.manual_seed(0)
        before = torch.get_rng_state()
        collect(train, 0)
        assert torch.equal(before, torch.get_rng_state()), pipeline


@pytest.mark.e2e  # DataLoader workers are processes
def test_torchvision_pipeline_is_the_same_with_persistent_workers(cifar10):
    single = cifar_loaders(cifar10, 10, batch_size=100, device=CPU, pipeline="torchvision", workers=0)[0]
    workers = cifar_loaders(cifar10, 10, batch_size=100, device=CPU, pipeline="torchvision", workers=2)[0]
    for epoch in (0, 1):  # the second epoch reuses the workers, whose own random state has moved on
        expected, got = collect(single, epoch), collect(workers, epoch)
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert workers.loader.persistent_workers


def test_tensor_train_batches_are_crops_of_the_source_images(cifar10):
    # Invert the whole pipeline for one batch: every image must be a padded crop, maybe flipped, of
    # the training image with its label.
    train, _, _ = cifar_loaders(cifar10, 10, batch_size=12, device=CPU, pipeline="tensor")
    train.set_epoch(4)
    images, labels = next(iter(train))
    pixels = denormalise(images, CIFAR_MEAN, CIFAR_STD).round().to(torch.uint8)
    train_set = load_cifar(cifar10, 10)[0]
    padded = F.pad(torch.from_numpy(train_set.data).permute(0, 3, 1, 2), (4, 4, 4, 4))
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1).permute(0, 2, 3, 1, 4, 5)  # (N, top, left, C, 32, 32)
    targets = torch.tensor(train_set.targets)
    for image, label in zip(pixels, labels):
        same_class = windows[targets == label].flatten(0, 2)
        matches = [(same_class == candidate).flatten(1).all(1).any() for candidate in (image, image.flip(-1))]
        assert matches[0] or matches[1]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_channels_last_batches(cifar10, pipeline):
    train, test, _ = cifar_loaders(cifar10, 10, device=CPU, pipeline=pipeline, workers=0, channels_last=True)
    for loader in (train, test):
        loader.set_epoch(0)
        images, _ = next(iter(loader))
        assert images.is_contiguous(memory_format=torch.channels_last)


def test_auto_pipeline_on_cpu(cifar10):
    assert cifar_loaders(cifar10, 10, device=CPU, pipeline="auto", workers=0)[2] == "tensor"


def test_epoch_seed_is_deterministic_and_spread():
    assert epoch_seed(0, 1) == epoch_seed(0, 1)
    seeds = {epoch_seed(seed, epoch) for seed in range(5) for epoch in range(200)}
    assert len(seeds) == 1000 and all(0 <= value < 2**63 for value in seeds)


# ----------------------------------------------------------------------------------------------
# ImageNet folders


def test_fake_imagefolder_writes_real_images_of_varying_size(image_folder, tmp_path):
    sizes = set()
    for split, per_class in (("train", 10), ("val", 5)):
        classes = sorted(path.name for path in (image_folder / split).iterdir())
        assert classes == ["class_000", "class_001", "class_002"]
        for name in classes:
            files = sorted((image_folder / split / name).iterdir())
            assert len(files) == per_class and all(path.suffix == ".jpg" for path in files)
            for path in files:
                with Image.open(path) as image:
                    assert image.format == "JPEG"
                    sizes.add(image.size)
                    assert all(34 <= side <= 46 for side in image.size)
    assert len(sizes) > 10
    assert (image_folder / MARKER_NAME).exists()
    png_root = write_fake_imagefolder(tmp_path, num_classes=2, train_per_class=1, val_per_class=1, ext="png")
    with Image.open(png_root / "val" / "class_001" / "0.png") as image:
        assert image.format == "PNG"
    with pytest.raises(GraftingError, match="extension"):
        write_fake_imagefolder(tmp_path, ext="gif")


def test_imagenet_val_batches_are_resized_center_crops_normalised_on_the_device(image_folder):
    train, val, num_classes = imagenet_loaders(image_folder, image_size=32, batch_size=6, workers=0, device=CPU)
    assert num_classes == 3
    assert (len(train), len(val)) == (math.ceil(30 / 6), math.ceil(15 / 6))
    images, labels = collect(val, 0)
    assert images.shape == (15, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [label for label in range(3) for _ in range(5)]  # ImageFolder order
    files = [image_folder / "val" / f"class_{label:03d}" / f"{number}.jpg" for label in range(3) for number in range(5)]
    for image, path in zip(images, files):
        pixels = TF.center_crop(
            TF.resize(decode_image(str(path), mode=ImageReadMode.RGB), [37], antialias=True), [32, 32]
        )
        by_hand = (pixels.double() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
            3, 1, 1
        )
        torch.testing.assert_close(image.double(), by_hand, rtol=0, atol=1e-5)


def test_imagenet_train_batches_depend_only_on_seed_and_epoch(image_folder):
    def loader():
        return imagenet_loaders(image_folder, image_size=24, batch_size=8, workers=0, device=CPU, seed=7)[0]

    running = loader()
    epoch0, epoch1 = collect(running, 0), collect(running, 1)
    assert epoch0[0].shape == (30, 3, 24, 24)
    assert sorted(epoch0[1].tolist()) == [label for label in range(3) for _ in range(10)]
    assert not torch.equal(epoch0[1], epoch1[1])
    for epoch, expected in ((1, epoch1), (0, epoch0)):
        again = collect(loader(), epoch)
        assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])
    pixels = denormalise(epoch0[0], IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)  # uint8 until normalised on the device


@pytest.mark.e2e  # DataLoader workers are processes
def test_imagenet_workers_give_the_same_batches(image_folder):
    loaders = [
        imagenet_loaders(image_folder, image_size=24, batch_size=8, workers=workers, device=CPU, channels_last=True)[0]
        for workers in (0, 2)
    ]
    expected, got = collect(loaders[0], 2), collect(loaders[1], 2)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_imagenet_distributed_uses_a_distributed_sampler(image_folder, tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train, val, _ = imagenet_loaders(
            image_folder, image_size=16, batch_size=8, workers=0, device=CPU, distributed=True, seed=3
        )
        assert isinstance(train.sampler.index_sampler, torch.utils.data.DistributedSampler)
        first, second = collect(train, 5), collect(train, 6)
        assert train.sampler.index_sampler.epoch == 6
        assert not torch.equal(first[1], second[1])
        assert torch.equal(collect(train, 5)[1], first[1])
        assert collect(val, 0)[1].tolist() == [label for label in range(3) for _ in range(5)]
    finally:
        torch.distributed.destroy_process_group()


def test_missing_or_unusable_imagenet_folders(image_folder, tmp_path):
    with pytest.raises(DatasetNotFoundError) as caught:
        imagenet_loaders(tmp_path / "nothing", device=CPU)
    assert str((tmp_path / "nothing" / "train").resolve()) in str(caught.value) and "--data" in str(caught.value)
    (tmp_path / "flat" / "train" / "class_a").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "flat" / "train" / "class_a" / "0.jpg")
    with pytest.raises(DatasetNotFoundError, match="val folder not found"):
        imagenet_loaders(tmp_path / "flat", device=CPU)
    (tmp_path / "flat" / "val").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "flat" / "val" / "0.jpg")  # not sorted into class folders
    with pytest.raises(DatasetNotFoundError, match="one folder per class"):
        imagenet_loaders(tmp_path / "flat", device=CPU)
    (tmp_path / "flat" / "val" / "class_b").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "flat" / "val" / "class_b" / "0.jpg")
    with pytest.raises(DatasetNotFoundError, match="same class folders"):
        imagenet_loaders(tmp_path / "flat", device=CPU)


def test_undecodable_image_names_the_file(tmp_path):
    root = write_fake_imagefolder(tmp_path, num_classes=2, train_per_class=2, val_per_class=1, image_size=16)
    broken = root / "val" / "class_001" / "0.jpg"
    broken.write_bytes(b"this is not a jpeg")
    _, val, _ = imagenet_loaders(root, image_size=16, batch_size=2, workers=0, device=CPU)
    with pytest.raises(GraftingError, match="0.jpg"):
        collect(val, 0)
