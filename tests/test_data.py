"""Data domains, sharded sampling, the DALI and torch loaders, and the generated dataset.

Every dataset here is a handful of tiny PNGs written into tmp_path. In most images the red channel
is one flat value that encodes which image it is, so a batch can be traced back to the exact files
it came from whatever the crop; the blue channel is noise, so that crops and flips show.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tada_dist.data import (
    DataError,
    Domain,
    ShardedSampler,
    TransformSpec,
    check_same_classes,
    create_eval_loader,
    create_train_loader,
    ensure_synthetic_dataset,
    load_domain,
)
from tada_dist.data.transforms import RandomCrops

BACKENDS = ("dali", "torch", "memory")  # memory: the torch backend with data.cache (decoded once)


def backend_args(backend: str) -> dict:
    """The factory arguments of a backend name."""
    return {"backend": "torch", "cache": True} if backend == "memory" else {"backend": backend}
# Mean 0 and std 1 leave pixel values in [0, 1], so the id in the red channel reads back exactly.
IDENTITY_NORMALIZE = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 12), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)
    return path


def write_id_image(path: Path, image_id: int, size: tuple[int, int]) -> None:
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:, :, 0] = 10 + 15 * image_id
    pixels[:, :, 1] = 200
    pixels[:, :, 2] = np.random.default_rng(image_id).integers(0, 256, size=(height, width))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def ids_in(images: torch.Tensor) -> list[int]:
    """Reads back the image ids that write_id_image() put in the red channel."""
    red = images[:, 0].mean(dim=(1, 2)) * 255.0
    return [round((value - 10.0) / 15.0) for value in red.tolist()]


def id_image_domain(root: Path, num_images: int, num_classes: int, size: tuple[int, int] = (12, 12)) -> Domain:
    """Image i belongs to class i % num_classes, so its label follows from its id."""
    for image_id in range(num_images):
        write_id_image(root / f"class{image_id % num_classes}" / f"{image_id:03d}.png", image_id, size)
    return load_domain(root)


# ---------------------------------------------------------------------------------------------- domains


def test_image_folder_lists_images_by_sorted_class(tmp_path):
    write_png(tmp_path / "dom" / "zebra" / "a.PNG", (1, 2, 3))
    write_png(tmp_path / "dom" / "apple" / "nested" / "b.png", (1, 2, 3))
    write_png(tmp_path / "dom" / "apple" / "c.JPG", (1, 2, 3))
    (tmp_path / "dom" / "apple" / "notes.txt").write_text("not an image")

    domain = load_domain(tmp_path / "dom")

    assert domain.name == "dom"
    assert domain.classes == ["apple", "zebra"]
    assert [Path(f).name for f in domain.files] == ["c.JPG", "b.png", "a.PNG"]
    assert domain.labels == [0, 0, 1]
    assert all(Path(f).is_absolute() for f in domain.files)


def test_image_folder_takes_the_given_class_order(tmp_path):
    write_png(tmp_path / "dom" / "a" / "1.png", (1, 2, 3))
    write_png(tmp_path / "dom" / "b" / "1.png", (1, 2, 3))
    domain = load_domain(tmp_path / "dom", classes=["b", "a"])
    assert domain.classes == ["b", "a"]
    assert domain.labels == [0, 1]


def test_image_list_resolves_paths_against_the_list_folder(tmp_path):
    relative = write_png(tmp_path / "images" / "x.png", (1, 2, 3))
    absolute = write_png(tmp_path / "elsewhere" / "y z.png", (1, 2, 3))
    list_file = tmp_path / "lists" / "amazon.txt"
    list_file.parent.mkdir()
    list_file.write_text(f"../images/x.png 2\n\n{absolute} 0\n")

    domain = load_domain(list_file)

    assert domain.name == "amazon"
    assert domain.files == [str(relative), str(absolute)]
    assert domain.labels == [2, 0]
    assert domain.classes == ["0", "1", "2"]
    assert load_domain(list_file, classes=["back_pack", "bike", "calculator"]).classes[2] == "calculator"


def test_image_list_in_tllib_layout_resolves_against_the_dataset_root(tmp_path):
    image = write_png(tmp_path / "office31" / "amazon" / "images" / "bike" / "1.jpg", (1, 2, 3))
    list_file = tmp_path / "office31" / "image_list" / "amazon.txt"
    list_file.parent.mkdir()
    list_file.write_text("amazon/images/bike/1.jpg 1\n")
    assert load_domain(list_file).files == [str(image)]


def _missing_domain(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "nowhere", "nowhere"


def _no_class_folders(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "flat").mkdir()
    write_png(tmp_path / "flat" / "lonely.png", (1, 2, 3))  # images directly in the domain folder
    return tmp_path / "flat", "no class subfolders"


def _empty_class_folder(tmp_path: Path) -> tuple[Path, str]:
    write_png(tmp_path / "dom" / "full" / "1.png", (1, 2, 3))
    (tmp_path / "dom" / "hollow").mkdir()
    return tmp_path / "dom", "hollow"


def _bad_list_line(tmp_path: Path) -> tuple[Path, str]:
    write_png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "list.txt").write_text("a.png 0\na.png seven\n")
    return tmp_path / "list.txt", "list.txt:2"


def _missing_listed_file(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "list.txt").write_text("ghost.png 0\n")
    return tmp_path / "list.txt", "ghost.png"


def _empty_list(tmp_path: Path) -> tuple[Path, str]:
    (tmp_path / "list.txt").write_text("\n")
    return tmp_path / "list.txt", "no images"


def _image_given_as_list(tmp_path: Path) -> tuple[Path, str]:
    noise = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "photo.png")
    return tmp_path / "photo.png", "photo.png"


def _corrupt_png(tmp_path: Path) -> tuple[Path, str]:
    write_png(tmp_path / "dom" / "a" / "good.png", (1, 2, 3))
    (tmp_path / "dom" / "a" / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    return tmp_path / "dom", "noise.png"


def _truncated_png(tmp_path: Path) -> tuple[Path, str]:
    good = write_png(tmp_path / "dom" / "a" / "good.png", (1, 2, 3), size=(64, 64))
    (tmp_path / "dom" / "a" / "cut.png").write_bytes(good.read_bytes()[:-30])
    return tmp_path / "dom", "cut.png"


def _empty_file(tmp_path: Path) -> tuple[Path, str]:
    write_png(tmp_path / "dom" / "a" / "good.png", (1, 2, 3))
    (tmp_path / "dom" / "a" / "zero.png").write_bytes(b"")
    return tmp_path / "dom", "zero.png"


@pytest.mark.parametrize(
    "make_bad_domain",
    [_missing_domain, _no_class_folders, _empty_class_folder, _bad_list_line, _missing_listed_file, _empty_list,
     _image_given_as_list, _corrupt_png, _truncated_png, _empty_file],
)
def test_bad_domains_raise_one_line_errors_naming_the_culprit(tmp_path, make_bad_domain):
    path, culprit = make_bad_domain(tmp_path)
    with pytest.raises(DataError) as error:
        load_domain(path)
    assert culprit in str(error.value)
    assert "\n" not in str(error.value)


def test_class_folders_must_match_the_given_classes(tmp_path):
    write_png(tmp_path / "dom" / "cat" / "1.png", (1, 2, 3))
    with pytest.raises(DataError, match=r"missing folders: \['dog'\]; unexpected folders: \[\]"):
        load_domain(tmp_path / "dom", classes=["cat", "dog"])


def test_list_labels_must_fit_the_given_classes(tmp_path):
    write_png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "list.txt").write_text("a.png 3\n")
    with pytest.raises(DataError, match="list.txt:1: label 3"):
        load_domain(tmp_path / "list.txt", classes=["a", "b"])


def test_skip_corrupt_drops_unreadable_images_with_a_log_line(tmp_path, caplog):
    write_png(tmp_path / "dom" / "a" / "good.png", (1, 2, 3))
    (tmp_path / "dom" / "a" / "noise.png").write_bytes(b"\x89PNG not really")
    write_png(tmp_path / "dom" / "b" / "fine.png", (1, 2, 3))
    (tmp_path / "dom" / "b" / "zero.png").write_bytes(b"")

    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="tada_dist"):
        warnings.simplefilter("error")  # a log line, not a Python warning with a source line
        domain = load_domain(tmp_path / "dom", skip_corrupt=True)
    assert re.search(r"dropped 2 unreadable image\(s\) \(data.skip_corrupt=true\): .*noise.png.*zero.png", caplog.text)

    assert [Path(f).name for f in domain.files] == ["good.png", "fine.png"]
    assert domain.labels == [0, 1]


def test_check_same_classes_lists_the_difference():
    source = Domain("a", ["/x.png"], [0], ["bird", "cat"])
    target = Domain("b", ["/y.png"], [0], ["bird", "dog"])
    with pytest.raises(DataError) as error:
        check_same_classes(source, target)
    assert str(error.value) == (
        "class sets differ between source 'a' and target 'b': only in source: ['cat']; only in target: ['dog']"
    )
    check_same_classes(source, Domain("c", ["/z.png"], [1], ["bird", "cat"]))


# ---------------------------------------------------------------------------------------------- sampler


def _epoch_shares(num_items: int, world_size: int, seed: int = 3) -> list[list[int]]:
    shares = []
    for rank in range(world_size):
        share_size = -(-num_items // world_size)
        sampler = ShardedSampler(num_items, share_size, rank=rank, world_size=world_size, seed=seed)
        shares.append(sampler.next_batch())
    return shares


def test_sampler_shards_cover_every_item_and_pad_like_distributed_sampler():
    rank0, rank1 = _epoch_shares(num_items=11, world_size=2)
    assert len(rank0) == len(rank1) == 6
    assert set(rank0) | set(rank1) == set(range(11))
    assert len(set(rank0) & set(rank1)) == 1  # the one padding index repeats the permutation's first item
    assert set(rank0[:5]).isdisjoint(rank1[:5])


def test_sampler_is_deterministic_and_reshuffles_each_epoch():
    first = ShardedSampler(10, 10, rank=0, world_size=1, seed=7)
    second = ShardedSampler(10, 10, rank=0, world_size=1, seed=7)
    epoch0, epoch1 = first.next_batch(), first.next_batch()
    assert [epoch0, epoch1] == [second.next_batch(), second.next_batch()]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1
    assert ShardedSampler(10, 10, rank=0, world_size=1, seed=8).next_batch() != epoch0
    assert ShardedSampler(10, 10, rank=0, world_size=1, seed=7, shuffle=False).next_batch() == list(range(10))


def test_sampler_batches_wrap_into_the_next_epoch_when_the_share_is_small():
    sampler = ShardedSampler(3, 4, rank=1, world_size=2, seed=0)  # a share of 2 items, batches of 4
    batch = sampler.next_batch()
    assert len(batch) == 4
    assert sampler.state_dict()["epoch"] == 1
    assert sampler.state_dict()["cursor"] == 2


def test_sampler_state_round_trip_reproduces_the_following_batches():
    sampler = ShardedSampler(13, 5, rank=0, world_size=2, seed=1)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(4)]

    resumed = ShardedSampler(13, 5, rank=0, world_size=2, seed=1)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(4)] == expected


def test_sampler_refuses_a_state_from_another_dataset():
    state = ShardedSampler(13, 5, rank=0, world_size=2, seed=1).state_dict()
    with pytest.raises(DataError, match="num_items=13"):
        ShardedSampler(14, 5, rank=0, world_size=2, seed=1).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- loaders


@pytest.fixture
def twelve_id_images(tmp_path) -> Domain:
    return id_image_domain(tmp_path / "ids", num_images=12, num_classes=3, size=(14, 10))


def _train_loader(domain: Domain, backend: str, *, batch_size: int = 4, rank: int = 0, world_size: int = 1, **spec):
    transform = TransformSpec(**{"resize": 10, "crop": 8, "flip": True, **IDENTITY_NORMALIZE, **spec})
    return create_train_loader(domain, batch_size=batch_size, transform=transform, rank=rank, world_size=world_size,
                               seed=5, **backend_args(backend), num_threads=1)


def _eval_loader(domain: Domain, backend: str, *, batch_size: int, rank: int = 0, world_size: int = 1, **spec):
    transform = TransformSpec(**{"resize": 10, "crop": 8, "flip": True, **IDENTITY_NORMALIZE, **spec})
    return create_eval_loader(domain, batch_size=batch_size, transform=transform, rank=rank, world_size=world_size,
                              **backend_args(backend), num_threads=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_have_the_crop_shape_and_the_labels_of_the_chosen_files(twelve_id_images, backend):
    loader = _train_loader(twelve_id_images, backend)
    for _ in range(4):  # crosses an epoch boundary: 12 images, batches of 4
        images, labels = next(loader)
        assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64
        assert labels.tolist() == [image_id % 3 for image_id in ids_in(images)]
    assert loader.data_wait_seconds > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_are_normalized_with_mean_and_std_in_unit_range(tmp_path, backend):
    write_png(tmp_path / "dom" / "only" / "0.png", (255, 128, 0))
    spec = TransformSpec(resize=10, crop=8, flip=True)
    loader = create_train_loader(load_domain(tmp_path / "dom"), batch_size=2, transform=spec, rank=0, world_size=1,
                                 seed=0, **backend_args(backend), num_threads=1)
    images, _ = next(loader)
    expected = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    assert torch.allclose(images.mean(dim=(0, 2, 3)), expected, atol=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grey_images_are_decoded_as_three_channels(tmp_path, backend):
    write_png(tmp_path / "dom" / "only" / "0.png", (90, 90, 90), mode="L")
    loader = _train_loader(load_domain(tmp_path / "dom"), backend, batch_size=1)
    images, _ = next(loader)
    assert images.shape == (1, 3, 8, 8)
    assert torch.allclose(images, torch.full_like(images, 90 / 255), atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_state_round_trip_replays_the_same_images(twelve_id_images, backend):
    loader = _train_loader(twelve_id_images, backend, batch_size=5)
    for _ in range(2):
        next(loader)
    state = loader.state_dict()
    expected = [ids_in(next(loader)[0]) for _ in range(4)]

    loader.load_state_dict(state)
    replayed = [next(loader)[0] for _ in range(4)]
    assert [ids_in(images) for images in replayed] == expected
    fresh = _train_loader(twelve_id_images, backend, batch_size=5)
    fresh.load_state_dict(state)
    # Crops and flips are drawn from each batch's key, so even they repeat exactly.
    assert all(torch.equal(next(fresh)[0], images) for images in replayed)


def test_torch_train_state_is_exact_while_workers_read_ahead(twelve_id_images):
    transform = TransformSpec(resize=10, crop=8, flip=False, **IDENTITY_NORMALIZE)
    loader = create_train_loader(twelve_id_images, batch_size=5, transform=transform, rank=0, world_size=1,
                                 seed=5, backend="torch", num_threads=2)
    next(loader)
    state = loader.state_dict()
    assert state["cursor"] == 5  # not the position of the batches the workers have already prefetched
    expected = [ids_in(next(loader)[0]) for _ in range(3)]
    loader.load_state_dict(state)
    assert [ids_in(next(loader)[0]) for _ in range(3)] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_ranks_read_disjoint_shards(twelve_id_images, backend):
    first_epochs = [ids_in(next(_train_loader(twelve_id_images, backend, batch_size=6, rank=rank, world_size=2))[0])
                    for rank in range(2)]
    assert set(first_epochs[0]).isdisjoint(first_epochs[1])
    assert sorted(first_epochs[0] + first_epochs[1]) == list(range(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_counts_every_image_once_across_ranks(tmp_path, backend):
    domain = id_image_domain(tmp_path / "seven", num_images=7, num_classes=7, size=(16, 12))
    seen = []
    for rank in range(2):
        loader = _eval_loader(domain, backend, batch_size=3, rank=rank, world_size=2)
        assert len(loader) == (4 if rank == 0 else 3)
        for _ in range(2):  # every pass yields the share again
            this_pass = []
            for images, labels in loader:
                assert images.shape[1:] == (3, 8, 8) and images.shape[0] <= 3
                assert labels.tolist() == ids_in(images)  # class i holds only image i
                this_pass += labels.tolist()
            assert len(this_pass) == len(loader)
        seen += this_pass
    assert sorted(seen) == list(range(7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_rank_without_images_yields_nothing(tmp_path, backend):
    domain = id_image_domain(tmp_path / "two", num_images=2, num_classes=2)
    loader = _eval_loader(domain, backend, batch_size=4, rank=2, world_size=3)
    assert len(loader) == 0
    assert list(loader) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_crops_the_centre(tmp_path, backend):
    # Left half black, right half white: a centre crop of the same width keeps both halves equally.
    image = np.zeros((10, 20, 3), dtype=np.uint8)
    image[:, 10:] = 255
    (tmp_path / "dom" / "only").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "dom" / "only" / "0.png")
    loader = _eval_loader(load_domain(tmp_path / "dom"), backend, batch_size=1, resize=10, crop=10)
    [(images, _)] = list(loader)
    assert images.shape == (1, 3, 10, 10)
    assert images[0, :, :, :5].max() < 0.01 and images[0, :, :, 5:].min() > 0.99


def test_dali_and_torch_eval_agree(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(3):
        (tmp_path / "dom" / f"c{index}").mkdir(parents=True)
        noise = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "dom" / f"c{index}" / "0.png")
        smooth = np.broadcast_to(np.linspace(0, 255, 24, dtype=np.uint8)[None, :, None], (20, 24, 3))
        Image.fromarray(np.ascontiguousarray(smooth)).save(tmp_path / "dom" / f"c{index}" / "1.png")
    domain = load_domain(tmp_path / "dom")

    def one_pass(backend: str, resize: int, crop: int) -> torch.Tensor:
        loader = create_eval_loader(domain, batch_size=4, transform=TransformSpec(resize=resize, crop=crop, flip=False),
                                    rank=0, world_size=1, **backend_args(backend), num_threads=1)
        return torch.cat([images for images, _ in loader])

    # Without resizing both backends must match to rounding; with resizing the interpolations differ slightly.
    unscaled = [one_pass(backend, resize=16, crop=16) for backend in ("dali", "torch")]
    noise_images = slice(0, None, 2)
    assert torch.allclose(unscaled[0][noise_images], unscaled[1][noise_images], atol=1e-4)
    rescaled = [one_pass(backend, resize=12, crop=10) for backend in ("dali", "torch", "memory")]
    assert (rescaled[0] - rescaled[1]).abs().mean() < 0.05
    assert torch.equal(rescaled[2], rescaled[1])  # the same torchvision resize, pixel for pixel


def test_loader_factories_reject_unknown_settings(twelve_id_images):
    transform = TransformSpec(resize=10, crop=8, flip=False)
    common = {"batch_size": 2, "transform": transform, "rank": 0, "world_size": 1}
    with pytest.raises(ValueError, match="'pytorch'.*dali, torch"):
        create_eval_loader(twelve_id_images, backend="pytorch", **common)
    with pytest.raises(ValueError, match="'tpu'.*cpu, gpu"):
        create_train_loader(twelve_id_images, seed=0, device="tpu", **common)
    with pytest.raises(DataError, match="crop 12 is larger than resize 10"):
        TransformSpec(resize=10, crop=12, flip=False)


def test_dali_backend_without_dali_installed_says_what_to_do(twelve_id_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    transform = TransformSpec(resize=10, crop=8, flip=False)
    with pytest.raises(DataError, match="pip install nvidia-dali.*data.loader=torch"):
        create_eval_loader(twelve_id_images, batch_size=2, transform=transform, rank=0, world_size=1, backend="dali")


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_is_written_once_with_matching_domains(tmp_path):
    root = ensure_synthetic_dataset(tmp_path / "shapes", images_per_class=3, size=32, seed=1)
    source, target = load_domain(root / "source"), load_domain(root / "target")
    assert source.classes == target.classes and len(source.classes) == 6
    assert len(source.files) == len(target.files) == 18
    with Image.open(target.files[0]) as image:
        assert image.mode == "RGB" and image.size == (32, 32)
    source_pixels = np.asarray(Image.open(source.files[0]), dtype=np.float32)
    target_pixels = np.asarray(Image.open(target.files[0]), dtype=np.float32)
    assert source_pixels.std(axis=2).max() == 0  # grey shapes on black
    assert target_pixels.std(axis=2).mean() > 10  # colourful backgrounds

    modified = Path(source.files[0]).stat().st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path / "shapes", images_per_class=3, size=32, seed=1) == root
    assert Path(source.files[0]).stat().st_mtime_ns == modified
    assert not [p for p in root.iterdir() if p.name.startswith(".staging")]


def test_synthetic_dataset_is_regenerated_when_its_parameters_change(tmp_path):
    ensure_synthetic_dataset(tmp_path / "shapes", images_per_class=2, seed=0)
    ensure_synthetic_dataset(tmp_path / "shapes", images_per_class=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_domain(tmp_path / "shapes" / "target").files) == 24


def test_dali_and_torch_train_batches_agree_crop_for_crop(tmp_path):
    """Both backends read the same RandomCrops; without resizing their outputs match exactly."""
    rng = np.random.default_rng(3)
    for index in range(6):
        (tmp_path / "dom" / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "dom" / f"c{index % 2}" / f"{index}.png")
    domain = load_domain(tmp_path / "dom")
    spec = TransformSpec(resize=12, crop=7, flip=True)

    def batches(backend: str) -> list[torch.Tensor]:
        loader = create_train_loader(domain, batch_size=4, transform=spec, rank=0, world_size=1, seed=9,
                                     **backend_args(backend), num_threads=1)
        return [next(loader)[0] for _ in range(3)]

    dali, torchvision, memory = batches("dali"), batches("torch"), batches("memory")
    for dali_images, torch_images, memory_images in zip(dali, torchvision, memory):
        torch.testing.assert_close(dali_images, torch_images, atol=1e-5, rtol=0)
        assert torch.equal(memory_images, torch_images)

    # The cache's shortcuts (the whole image when the crop leaves no room, one mean and std for every
    # channel as the digits config has) give the torch loader's pixels too.
    whole = TransformSpec(resize=12, crop=12, flip=True, mean=(0.5,) * 3, std=(0.5,) * 3)
    loaders = [create_train_loader(domain, batch_size=4, transform=whole, rank=0, world_size=1, seed=9,
                                   **backend_args(backend), num_threads=1) for backend in ("torch", "memory")]
    for _ in range(3):
        (torch_images, torch_labels), (memory_images, memory_labels) = (next(loader) for loader in loaders)
        assert torch.equal(memory_images, torch_images) and torch.equal(memory_labels, torch_labels)

    # The crops really are random: one image repeated through a batch is cut in different places.
    (tmp_path / "one" / "c").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)).save(tmp_path / "one" / "c" / "0.png")
    loader = create_train_loader(load_domain(tmp_path / "one"), batch_size=8, transform=spec, rank=0, world_size=1,
                                 seed=9, num_threads=1)
    images = next(loader)[0]
    assert len({tuple(image.flatten().tolist()) for image in images}) > 4


# ---------------------------------------------------------------------------------------------- thuml transforms


def test_random_resized_windows_follow_torchvision_bounds_and_repeat_from_their_key():
    crops = RandomCrops.draw(2000, flip=True, key=(1, 0, 3, 64), kind="random_resized")
    area, ratio = crops.width * crops.height, crops.width / crops.height
    full = (crops.width == 1.0) & (crops.height == 1.0)  # the fallback after ten misses
    assert ((area >= 0.08 - 1e-6) & (area <= 1 + 1e-6)).all()
    assert ((ratio >= 0.75 - 1e-6) & (ratio <= 4 / 3 + 1e-6) | full).all()
    assert (crops.x >= 0).all() and (crops.y >= 0).all()
    assert (crops.x + crops.width <= 1 + 1e-6).all() and (crops.y + crops.height <= 1 + 1e-6).all()
    assert 0.3 < area.mean() < 0.7 and 0.4 < crops.flip.mean() < 0.6
    again = RandomCrops.draw(2000, flip=True, key=(1, 0, 3, 64), kind="random_resized")
    assert np.array_equal(again.x, crops.x) and np.array_equal(again.width, crops.width)


def quarter_black_image(folder: Path) -> Domain:
    """20 wide, 10 high: the left quarter black, the rest white."""
    image = np.full((10, 20, 3), 255, dtype=np.uint8)
    image[:, :5] = 0
    (folder / "only").mkdir(parents=True)
    Image.fromarray(image).save(folder / "only" / "0.png")
    return load_domain(folder)


@pytest.mark.parametrize("backend", BACKENDS)
def test_square_resize_keeps_the_whole_width_and_shorter_resize_crops_it(tmp_path, backend):
    domain = quarter_black_image(tmp_path / "dom")
    [(square, _)] = list(_eval_loader(domain, backend, batch_size=1, resize_mode="square"))
    [(shorter, _)] = list(_eval_loader(domain, backend, batch_size=1, resize_mode="shorter"))
    assert square.shape == shorter.shape == (1, 3, 8, 8)
    # Square: 20 x 10 -> 10 x 10, the black quarter spans 2.5 columns, 1.5 of them inside the centre crop.
    assert 0.1 < (square < 0.5).float().mean() < 0.25
    # Shorter side: 20 x 10 stays 20 x 10 and the centre 8 columns are all white.
    assert shorter.min() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_crop_views_are_the_corners_the_centre_and_their_mirrors(tmp_path, backend):
    rng = np.random.default_rng(4)
    (tmp_path / "dom" / "c").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)).save(tmp_path / "dom" / "c" / "0.png")
    domain = load_domain(tmp_path / "dom")
    [(views, labels)] = list(_eval_loader(domain, backend, batch_size=2, ten_crop=True))
    [(centre, _)] = list(_eval_loader(domain, backend, batch_size=2))
    assert views.shape == (1, 10, 3, 8, 8) and labels.tolist() == [0]
    pixels = torch.from_numpy(np.array(Image.open(domain.files[0]))).permute(2, 0, 1).float() / 255
    corners = [pixels[:, :8, :8], pixels[:, :8, 2:], pixels[:, 2:, :8], pixels[:, 2:, 2:], pixels[:, 1:9, 1:9]]
    for index, expected in enumerate(corners):
        torch.testing.assert_close(views[0, index], expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(views[0, 5 + index], expected.flip(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(views[0, 4], centre[0])


def test_dali_and_torch_random_resized_crops_cut_the_same_windows(tmp_path):
    # A smooth two-way gradient: each window has its own mean colour, and interpolation barely matters.
    ramp = np.linspace(0, 255, 40)
    image = np.stack([np.broadcast_to(ramp[None, :], (40, 40)), np.broadcast_to(ramp[:, None], (40, 40)),
                      np.full((40, 40), 128.0)], axis=2).astype(np.uint8)
    (tmp_path / "dom" / "c").mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "dom" / "c" / "0.png")
    domain = load_domain(tmp_path / "dom")
    spec = TransformSpec(resize=40, crop=16, flip=True, resize_mode="square", train_crop="random_resized",
                         **IDENTITY_NORMALIZE)

    def batch(backend: str) -> torch.Tensor:
        loader = create_train_loader(domain, batch_size=8, transform=spec, rank=0, world_size=1, seed=2,
                                     **backend_args(backend), num_threads=1)
        return next(loader)[0]

    dali, torchvision = batch("dali"), batch("torch")
    assert torch.equal(batch("memory"), torchvision)
    assert dali.shape == torchvision.shape == (8, 3, 16, 16)
    assert (dali - torchvision).abs().mean() < 0.02
    assert dali.mean(dim=(2, 3))[:, :2].std(dim=0).min() > 0.02  # the windows differ from image to image


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_batches_hold_the_same_pixels_in_nhwc_memory(twelve_id_images, backend):
    """The GPU fast path: batches come channels-last (DALI writes HWC), values unchanged."""
    plain = _train_loader(twelve_id_images, backend)
    nhwc = _train_loader(twelve_id_images, backend, channels_last=True)
    for _ in range(2):
        expected, got = next(plain)[0], next(nhwc)[0]
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
        assert torch.equal(got, expected)
    [(views, _)] = list(_eval_loader(twelve_id_images, backend, batch_size=12, ten_crop=True, channels_last=True))
    [(centre, _)] = list(_eval_loader(twelve_id_images, backend, batch_size=12))
    assert views.shape == (12, 10, 3, 8, 8) and torch.equal(views[:, 4], centre)
