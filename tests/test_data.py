"""Loaders on generated fixtures, the task sampler's determinism and correctness, and data errors."""

import zipfile

import pytest
import torch

import mamlfast
from fixtures import make_mini_imagenet, make_omniglot
from mamlfast.data import DatasetError, load_dataset
from mamlfast.data.omniglot import load_omniglot
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
