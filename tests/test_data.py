"""Loaders on generated fixtures, the task sampler's determinism and correctness, and data errors."""

import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mamlfast
from fixtures import make_mini_imagenet, make_omniglot
from mamlfast.data import DatasetError, infer_dataset, load_dataset
from mamlfast.data import images as images_module
from mamlfast.data.images import ImageSource, decode
from mamlfast.data.omniglot import list_classes, load_omniglot
from mamlfast.data.synthetic import make_synthetic


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))


CFG = mamlfast.MAMLConfig.preset("omniglot-5w1s", k_query=2, image_size=16)


def test_omniglot_folders_and_zips_give_the_same_classes_and_split(tmp_path):
    folders = load_omniglot(make_omniglot(tmp_path / "folders"), image_size=28)
    zips = load_omniglot(make_omniglot(tmp_path / "zips", zipped=True), image_size=28)
    assert sum(s.num_classes for s in folders.values()) == 60
    # 1150/50/423 of 1623, in proportion
    assert {k: v.num_classes for k, v in folders.items()} == {"train": 43, "val": 2, "test": 15}
    for split in folders:
        assert folders[split].names == zips[split].names
        assert torch.equal(folders[split].images, zips[split].images)
    train = folders["train"]
    assert train.images.shape == (43 * 4, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.images.float().mean() < 128, "inverted: ink bright on a dark background"
    assert all("/character" in name for name in train.names)
    again = load_omniglot(tmp_path / "folders", image_size=28)  # from the cache
    assert again["test"].names == folders["test"].names and torch.equal(again["test"].images, folders["test"].images)


def test_image_extensions_count_in_any_case(tmp_path):
    """IMG.PNG is an image as img.png is: in folders as in zips, in the parts layout as in the alphabets one."""
    folders = make_omniglot(tmp_path / "folders", suffixes=(".png", ".PNG", ".Png"))
    zips = make_omniglot(tmp_path / "zips", suffixes=(".png", ".PNG", ".Png"), zipped=True)
    alphabets = tmp_path / "alphabets"
    for part in (folders / "images_background", folders / "images_evaluation"):
        shutil.copytree(part, alphabets, dirs_exist_ok=True)
    for root in (folders, zips, alphabets):
        classes, _ = list_classes(root)
        assert len(classes) == 60 and all(len(sources) == 4 for _, sources in classes), root
    assert infer_dataset(alphabets) == "omniglot"
    from_folders, from_zips = load_omniglot(folders, image_size=16), load_omniglot(zips, image_size=16)
    assert all(torch.equal(from_folders[split].images, from_zips[split].images) for split in from_folders)


def test_mini_imagenet_layout(tmp_path):
    cfg = mamlfast.MAMLConfig.preset("mini-imagenet-5w1s", image_size=16, k_query=3)
    dataset = load_dataset("mini-imagenet", cfg, make_mini_imagenet(tmp_path))
    assert {k: v.num_classes for k, v in dataset.splits.items()} == {"train": 6, "val": 5, "test": 5}
    assert dataset.splits["val"].images.shape == (20, 3, 16, 16)
    batch = dataset.sampler("train", cfg).training_batch(0, 0, 2)
    assert batch.x_support.shape == (2, 5, 3, 16, 16) and batch.x_query.shape == (2, 15, 3, 16, 16)
    assert abs(batch.x_support.mean().item()) < 1.0, "normalised with ImageNet statistics"


def test_synthetic_set_is_deterministic_from_its_seed():
    a, b, c = make_synthetic(0, 16), make_synthetic(0, 16), make_synthetic(1, 16)
    assert torch.equal(a["val"].images, b["val"].images)
    assert not torch.equal(a["val"].images, c["val"].images)
    assert a["train"].images.shape == (800 * 20, 1, 16, 16)


def _omniglot_dataset(tmp_path):
    return load_dataset("omniglot", CFG, make_omniglot(tmp_path, images_per_class=5))


def test_sampler_is_a_function_of_seed_and_iteration(tmp_path):
    sampler = _omniglot_dataset(tmp_path).sampler("train", CFG)
    first, again = sampler.training_batch(7, 3, 4), sampler.training_batch(7, 3, 4)
    assert all(torch.equal(getattr(first, f), getattr(again, f)) for f in ("x_support", "x_query", "y_query"))
    assert not torch.equal(first.x_support, sampler.training_batch(7, 4, 4).x_support)
    assert not torch.equal(first.x_support, sampler.training_batch(8, 3, 4).x_support)
    part = sampler.training_batch(7, 3, 4, tasks=slice(1, 3))
    assert torch.equal(part.x_query, first.x_query[1:3])


def test_tasks_hold_distinct_classes_and_consistent_labels(tmp_path):
    dataset = _omniglot_dataset(tmp_path)
    sampler = dataset.sampler("train", CFG)
    indices, rotations = sampler.draw(torch.Generator().manual_seed(0), 16)
    assert indices.shape == (16, 5, 3) and rotations.shape == (16, 5)
    counts, offsets = sampler.counts, sampler.offsets
    classes = torch.searchsorted(offsets, indices, right=True) - 1  # class of every image
    assert torch.all(classes == classes[..., :1]), "every image of a task's class comes from one class"
    assert all(len(set(task[:, 0].tolist())) == 5 for task in classes), "a task's classes are distinct"
    assert all(len(set(row.tolist())) == 3 for row in indices.flatten(0, 1)), "no image drawn twice"
    assert torch.all(indices < (offsets + counts)[classes])
    assert len(set(rotations.flatten().tolist())) == 4, "training classes are rotated by all multiples of 90"

    batch = sampler.batch(indices[:1], rotations[:1])
    assert batch.y_support.tolist() == [[0, 1, 2, 3, 4]] and batch.y_query.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]
    raw = dataset.splits["train"].images[indices[0]].float() / 255  # [N, K+Q, 1, H, W]
    for way in range(5):
        turned = torch.rot90(raw[way], int(rotations[0, way]), dims=(-2, -1))
        assert torch.equal(batch.x_support[0, way], turned[0])
        assert torch.equal(batch.x_query[0, 2 * way:2 * way + 2], turned[1:])


def test_evaluation_tasks_are_fixed_and_unrotated(tmp_path):
    dataset = _omniglot_dataset(tmp_path)
    val = dataset.sampler("val", CFG.replace(n_way=2))
    a, b = val.fixed_tasks(10), val.fixed_tasks(10)
    assert torch.equal(a[0], b[0]) and not torch.any(a[1])
    assert torch.equal(a[0][:5], val.fixed_tasks(5)[0])
    assert len({tuple(t.flatten().tolist()) for t in a[0]}) > 1


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("empty", "holds neither images_background/ nor images_background.zip"),
    ("corrupt image", r"corrupt image .*character03/0002_02\.png"),
    ("corrupt zip", r"corrupt zip file .*images_evaluation\.zip"),
])
def test_omniglot_errors_name_the_problem(tmp_path, damage, message):
    root = tmp_path / "omniglot"
    if damage == "empty":
        root.mkdir()
    elif damage == "corrupt image":
        make_omniglot(root)
        (root / "images_background/Alpha/character03/0002_02.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    elif damage == "corrupt zip":
        make_omniglot(root, zipped=True)
        data = (root / "images_evaluation.zip").read_bytes()
        (root / "images_evaluation.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=message):
        load_dataset("omniglot", CFG, root)


def test_corrupt_member_of_a_zip_is_named(tmp_path):
    root = make_omniglot(tmp_path, zipped=True)
    path = root / "images_background.zip"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    victim = sorted(members)[5]
    members[victim] = b"not a png"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(DatasetError, match=rf"corrupt image .*images_background\.zip:{victim}"):
        load_dataset("omniglot", CFG, root)


def test_tasks_too_large_for_the_data(tmp_path):
    dataset = _omniglot_dataset(tmp_path)
    with pytest.raises(DatasetError, match="the val split has 2 classes, fewer than n_way=5"):
        dataset.sampler("val", CFG)
    with pytest.raises(DatasetError, match=r"has 5 images, fewer than k_shot \+ k_query = 4 \+ 2"):
        dataset.sampler("train", CFG.replace(k_shot=4))
    with pytest.raises(DatasetError, match="omniglot images have 1 channel"):
        load_dataset("omniglot", CFG.replace(image_channels=3), tmp_path)
    with pytest.raises(DatasetError, match="needs a data root"):
        load_dataset("omniglot", CFG)


def test_a_corrupt_deflated_member_of_a_zip_is_named(tmp_path):
    root = make_omniglot(tmp_path / "source")
    path = tmp_path / "images_background.zip"
    victim = "images_background/Alpha/character01/0000_01.png"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(root / victim, victim)
    data = bytearray(path.read_bytes())
    start = 30 + len(victim)  # the compressed bytes follow the local header and the name
    data[start:start + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive, pytest.raises(DatasetError, match=rf"corrupt zip file .*{victim}"):
        decode(ImageSource(str(path), victim), archive, 28, "L")


def _saved(tmp_path, image: Image.Image, name: str = "image.png", **options) -> ImageSource:
    path = tmp_path / name
    image.save(path, **options)
    return ImageSource(str(path))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 257 * 60, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)  # 0, 60, 128, 255 in 8 bits
    source = _saved(tmp_path, Image.fromarray(levels))
    assert Image.open(source.path).mode == "I;16"
    decoded = decode(source, None, 4, "L")
    assert decoded.shape == (1, 4, 4) and decoded[0, 0].tolist() == [0, 60, 128, 255]
    assert decode(source, None, 4, "RGB")[:, 0, 2].tolist() == [128, 128, 128]


def test_alpha_is_dropped_where_opaque_and_refused_where_transparent(tmp_path):
    rgb = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    opaque = rgb.copy()
    opaque.putalpha(255)
    assert (decode(_saved(tmp_path, opaque, "opaque.png"), None, 4, "RGB") ==
            decode(_saved(tmp_path, rgb, "rgb.png"), None, 4, "RGB")).all()
    holes = rgb.copy()
    holes.putalpha(Image.fromarray((np.arange(16).reshape(4, 4) % 2 * 255).astype(np.uint8)))
    with pytest.raises(DatasetError, match=r"holes\.png is transparent in places \(mode RGBA\)"):
        decode(_saved(tmp_path, holes, "holes.png"), None, 4, "RGB")
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    with pytest.raises(DatasetError, match=r"palette\.png is transparent in places"):
        decode(_saved(tmp_path, palette, "palette.png", transparency=0), None, 4, "L")


@pytest.mark.parametrize("mode", ["F", "I"])
def test_modes_without_a_fixed_range_are_refused_by_name(tmp_path, mode):
    image = Image.fromarray(np.full((4, 4), 3, dtype=np.float32 if mode == "F" else np.int32))
    source = _saved(tmp_path, image, "deep.tif")
    with pytest.raises(DatasetError, match=rf"deep\.tif has PIL mode {mode}, which mamlfast does not decode"):
        decode(source, None, 4, "L")


def test_the_dataset_is_told_from_the_folder(tmp_path):
    assert infer_dataset(make_omniglot(tmp_path / "omniglot", zipped=True)) == "omniglot"
    assert infer_dataset(make_mini_imagenet(tmp_path / "mini")) == "mini-imagenet"
    with pytest.raises(DatasetError, match="cannot tell which dataset .* holds: it has neither"):
        infer_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        infer_dataset(tmp_path / "nowhere")


def _cache_file() -> Path:
    (path,) = images_module.cache_dir().glob("omniglot-*.pt")
    return path


def test_an_unreadable_cache_in_a_read_only_folder_is_rebuilt_in_memory(tmp_path, monkeypatch, caplog):
    root = make_omniglot(tmp_path / "omniglot")
    first = load_omniglot(root, image_size=16)
    _cache_file().write_bytes(b"damaged")

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(images_module, "atomic_open", read_only)
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.images"):
        again = load_omniglot(root, image_size=16)
    assert torch.equal(again["train"].images, first["train"].images)
    assert "is unreadable" in caplog.text and "could not write the cache file" in caplog.text


def test_a_cache_that_does_not_match_its_source_is_rebuilt(tmp_path, caplog):
    root = make_omniglot(tmp_path / "omniglot")
    first = load_omniglot(root, image_size=16)
    saved = torch.load(_cache_file(), weights_only=True)
    saved["images"] = saved["images"][:-3]  # as a cache written by a broken version might hold
    torch.save(saved, _cache_file())
    with caplog.at_level(logging.WARNING, logger="mamlfast.data.images"):
        again = load_omniglot(root, image_size=16)
    for split in first:
        assert torch.equal(again[split].images, first[split].images) and again[split].names == first[split].names
    assert "of the wrong shape or type" in caplog.text
    assert torch.load(_cache_file(), weights_only=True)["images"].shape[0] == first["train"].images.shape[0] + \
        first["val"].images.shape[0] + first["test"].images.shape[0], "replaced by the rebuilt one"
