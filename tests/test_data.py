"""Loaders on generated fixtures, the task sampler's determinism and correctness, and data errors."""

import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import mamlfast
from fixtures import MINI_IMAGENET_CLASSES, make_mini_imagenet, make_omniglot
from mamlfast.data import DatasetError, TaskSampler, infer_dataset, load_dataset
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
    owner = torch.full((sampler.images.shape[0],), -1)  # the class of every row, -1 for other splits' rows
    for c, (offset, count) in enumerate(zip(offsets.tolist(), counts.tolist())):
        owner[offset:offset + count] = c
    classes = owner[indices]  # class of every image
    assert torch.all(classes >= 0), "every image is one of the split's"
    assert torch.all(classes == classes[..., :1]), "every image of a task's class comes from one class"
    assert all(len(set(task[:, 0].tolist())) == 5 for task in classes), "a task's classes are distinct"
    assert all(len(set(row.tolist())) == 3 for row in indices.flatten(0, 1)), "no image drawn twice"
    assert torch.all(indices < (offsets + counts)[classes])
    assert len(set(rotations.flatten().tolist())) == 4, "training classes are rotated by all multiples of 90"

    batch = sampler.batch(indices[:1], rotations[:1])
    assert batch.y_support.tolist() == [[0, 1, 2, 3, 4]] and batch.y_query.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]]
    raw = dataset.splits["train"].pool[indices[0]].float() / 255  # [N, K+Q, 1, H, W]
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
    assert infer_dataset(make_mini_imagenet(tmp_path / "mini", MINI_IMAGENET_CLASSES, 1, size=4)) == "mini-imagenet"
    assert infer_dataset(make_mini_imagenet(tmp_path / "other")) == "folder", "split folders of other class counts"
    assert infer_dataset(tmp_path / "other", split_file="splits.json") == "folder"
    (tmp_path / "both" / "train").mkdir(parents=True)
    (tmp_path / "both" / "images_background.zip").touch()
    with pytest.raises(DatasetError, match="cannot tell which dataset .* both Omniglot's parts and split folders"):
        infer_dataset(tmp_path / "both")
    with pytest.raises(DatasetError, match="cannot tell which dataset .* holds: it has neither"):
        infer_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        infer_dataset(tmp_path / "nowhere")


def test_a_gpu_run_holds_the_images_on_the_device_where_they_fit_a_share_of_its_free_memory(tmp_path, monkeypatch):
    dataset = _omniglot_dataset(tmp_path)
    assert dataset.nbytes == 300 * 16 * 16  # 60 classes of 5 images of 1x16x16
    free = [4 * dataset.nbytes]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free[0], 10**12))
    assert dataset.data_device("cuda:0") == torch.device("cuda:0")
    assert dataset.placement("cuda:0") == "300 images of 1x16x16, 0.07 MiB, held on cuda:0"
    free[0] -= 1
    assert dataset.data_device("cuda:0") == torch.device("cuda:0"), "decided once per device, for every split"
    assert dataset.data_device("cuda:1") == torch.device("cpu")
    assert dataset.placement("cuda:1") == ("300 images of 1x16x16, 0.07 MiB, held on the host and copied to cuda:1 "
                                           "per meta-batch (more than 25% of its free memory)")
    assert dataset.data_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_images_held_on_the_host_give_the_batches_of_images_held_on_the_gpu(tmp_path):
    dataset = _omniglot_dataset(tmp_path)
    split = dataset.splits["train"]
    samplers = [TaskSampler(split, CFG, name="train", mean=(0.25,), std=(0.5,), rotate=True, device="cuda",
                            data_device=where) for where in ("cuda", "cpu")]
    assert samplers[0].images.device.type == "cuda" and samplers[1].images.device.type == "cpu"
    for iteration in range(3):
        on_device, on_host = (s.training_batch(7, iteration, 4) for s in samplers)
        for name in ("x_support", "y_support", "x_query", "y_query"):
            assert getattr(on_host, name).device.type == "cuda"
            assert torch.equal(getattr(on_host, name), getattr(on_device, name)), name
    indices, rotations = samplers[1].fixed_tasks(5)
    assert torch.equal(samplers[1].batch(indices, rotations).x_query,
                       samplers[0].batch(*samplers[0].fixed_tasks(5)).x_query)
