"""Folder data sets: split folders or a split file, grayscale and RGB at any size, normalisation
statistics recorded and reused, and one line naming the file for every bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mamlfast
from fixtures import make_folder
from mamlfast import checkpoints
from mamlfast.data import DatasetError, load_dataset
from mamlfast.data.images import ClassImages

TINY = ["--image-size", "16", "--num-filters", "4", "--inner-steps", "2", "--eval-inner-steps", "2",
        "--meta-batch-size", "2", "--epochs", "2", "--iters-per-epoch", "2", "--eval-tasks", "4", "--k-query", "1",
        "--log-every", "1", "--backend", "torch", "--no-progress"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))


def _cfg(**fields):
    return mamlfast.MAMLConfig.preset("mini-imagenet-5w1s", **dict(dict(k_query=2), **fields))


def _pil(path: str, size: int, mode: str) -> np.ndarray:
    """What an image should decode to, by Pillow alone: [C, size, size] uint8."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB").convert(mode).resize((size, size), Image.LANCZOS))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


@pytest.mark.parametrize("channels", [1, 3], ids=["grayscale", "RGB"])
def test_split_folders_at_an_odd_size(tmp_path, channels):
    root = make_folder(tmp_path / "data")
    cfg = _cfg(image_size=19, image_channels=channels)
    dataset = load_dataset("folder", cfg, root)
    mode = "L" if channels == 1 else "RGB"
    for split, count in (("train", 6), ("val", 5), ("test", 5)):
        classes = dataset.splits[split]
        assert classes.names == [str(root / split / f"{split}-class{c}") for c in range(count)]
        assert classes.counts.tolist() == [4] * count
        for name, first, rows in zip(classes.names, classes.offsets.tolist(), classes.counts.tolist()):
            files = sorted(Path(name).iterdir())
            expected = np.stack([_pil(str(f), 19, mode) for f in files])
            assert np.array_equal(classes.pool[first:first + rows].numpy(), expected), name
    pixels = dataset.splits["train"].images.double() / 255  # [N, C, H, W]
    mean, std = pixels.mean((0, 2, 3)), pixels.std((0, 2, 3), unbiased=False)
    torch.testing.assert_close(torch.tensor(dataset.mean, dtype=torch.float64), mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(dataset.std, dtype=torch.float64), std, rtol=1e-10, atol=0)
    assert dataset.options == dict(image_mean=list(dataset.mean), image_std=list(dataset.std))
    batch = dataset.sampler("train", cfg).training_batch(0, 0, 3)
    assert batch.x_support.shape == (3, 5, channels, 19, 19) and batch.x_query.shape == (3, 10, channels, 19, 19)


def test_a_split_file_names_the_classes_of_each_split(tmp_path):
    root = make_folder(tmp_path / "data", classes=((None, 12),))
    (root / "group" / "nested").mkdir(parents=True)
    for path in sorted((root / "class11").iterdir()):
        path.rename(root / "group" / "nested" / path.name)
    (root / "class10" / "image0.png").write_bytes(b"not an image: this class is in no split, so never read")
    named = {"train": [f"class{c}" for c in range(5)] + ["group/nested"], "val": ["class5", "class6", "class7"],
             "test": ["class9", "class8"]}
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps(named))
    dataset = load_dataset("folder", _cfg(n_way=3, image_size=17), root, split_file=split_file)
    for split, names in named.items():
        assert dataset.splits[split].names == [str(root / name) for name in names]
        assert dataset.splits[split].origin == f"split file {split_file}"
    assert dataset.options["split_file"] == str(split_file)
    again = load_dataset("folder", _cfg(n_way=3, image_size=17), root, split_file=split_file)
    assert torch.equal(again.splits["test"].images, dataset.splits["test"].images)


def test_classes_are_views_of_one_pool_and_pack_onto_a_device():
    pool = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    classes = ClassImages(pool, torch.tensor([3, 2, 5]), ["a", "b", "c"])
    picked = classes.select([2, 0, 1])
    assert picked.pool is pool and picked.blocks() == [(5, 5), (0, 5)]
    packed = picked.packed("cpu")
    assert packed.pool.flatten().tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert packed.offsets.tolist() == [0, 5, 8] and torch.equal(packed.images, picked.images)


def _main(capsys, *args):
    from mamlfast.cli import main
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _break(root: Path, tmp_path: Path, damage: str) -> list:
    """Damage the folder data set at ``root``; the extra options to train on it."""
    if damage == "unreadable image":
        (root / "val" / "val-class2" / "image1.JPG").write_bytes(b"\xff\xd8\xff not a whole JPEG")
    elif damage == "too few images":
        for path in sorted((root / "test" / "test-class3").iterdir())[1:]:
            path.unlink()
    elif damage == "too few classes":
        for c in range(2, 5):
            shutil.rmtree(root / "val" / f"val-class{c}")
    elif damage == "empty split":
        for path in (root / "test").rglob("*.*"):
            path.unlink()
    elif damage == "image in a split folder":
        (root / "train" / "train-class0" / "image0.png").rename(root / "train" / "stray.png")
    elif damage == "missing split":
        (root / "val").rename(root / "validation")
    elif damage == "split file: not JSON":
        (tmp_path / "splits.json").write_text("{train: [")
        return ["--split-file", tmp_path / "splits.json"]
    elif damage == "split file: unknown class":
        (tmp_path / "splits.json").write_text(json.dumps(dict(train=["train/train-class0"], val=["val/nothing"],
                                                              test=["test/test-class0"])))
        return ["--split-file", tmp_path / "splits.json"]
    elif damage == "split file: a class twice":
        (tmp_path / "splits.json").write_text(json.dumps(dict(train=["train/train-class0"], val=["val/val-class0"],
                                                              test=["train/train-class0/"])))
        return ["--split-file", tmp_path / "splits.json"]
    elif damage == "split file: missing":
        return ["--split-file", tmp_path / "nowhere.json"]
    return []


@pytest.mark.parametrize("damage, message", [
    ("unreadable image", "corrupt image {root}/val/val-class2/image1.JPG"),
    ("too few images", "class {root}/test/test-class3 of the test split has 1 images, fewer than k_shot + k_query"),
    ("too few classes", "the val split ({root}/val) has 2 classes, fewer than n_way=5"),
    ("empty split", "the test split is empty: {root}/test gives it no class folders with images"),
    ("image in a split folder", "image {root}/train/stray.png lies in a split folder, not in a class folder"),
    ("missing split", "{root} has no val/ folder"),
    ("split file: not JSON", "split file {tmp}/splits.json is not valid JSON"),
    ("split file: unknown class", "split file {tmp}/splits.json names the val class val/nothing, but "
                                  "{root}/val/nothing is not a folder"),
    ("split file: a class twice", "split file {tmp}/splits.json names the class train/train-class0/ twice "
                                  "(train and test)"),
    ("split file: missing", "cannot read split file {tmp}/nowhere.json"),
])
def test_bad_input_gets_one_line_naming_the_file(tmp_path, monkeypatch, capsys, damage, message):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "data")
    extra = _break(root, tmp_path, damage)
    code, _, err = _main(capsys, "train", "--out", "run", "--dataset", "folder", "--data-root", root, *TINY, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert message.format(root=root, tmp=tmp_path) in lines[0]


@pytest.mark.parametrize("options, message", [
    (dict(image_channels=2), "a folder dataset is read with 1 channel (grayscale) or 3 (RGB)"),
    (dict(image_mean=[0.5, 0.5, 0.5]), "image_std=None: must be 3 finite number(s)"),
    (dict(image_mean=[0.5], image_std=[0.2]), "image_mean=[0.5]: must be 3 finite number(s)"),
    (dict(image_mean=[0.5] * 3, image_std=[0.2, 0.0, 0.2]), "image_std=[0.2, 0.0, 0.2]: must be positive"),
])
def test_wrong_channels_or_statistics_are_refused(tmp_path, options, message):
    cfg = _cfg(image_size=16, image_channels=options.pop("image_channels", 3))
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_dataset("folder", cfg, make_folder(tmp_path / "data"), **options)
    with pytest.raises(DatasetError, match="split_file applies to the folder dataset"):
        load_dataset("omniglot", _cfg(image_channels=1), tmp_path, split_file="splits.json")


def test_the_data_root_alone_tells_a_folder_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "data")
    code, out, err = _main(capsys, "train", "--out", "run", "--data-root", root, *TINY, "--stop-at", "0")
    assert code == 130, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "folder"
    assert "data: 64 images of 1x16x16, 0.02 MiB, held on the host" in out


def test_statistics_are_recorded_and_reused_on_resume_and_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "data")
    code, _, err = _main(capsys, "train", "--out", "run", "--data-root", root, *TINY, "--image-channels", "3",
                         "--stop-at", "1")
    assert code == 130, err
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    expected = load_dataset("folder", _cfg(image_size=16), root)
    assert recorded["image_mean"] == list(expected.mean) and recorded["image_std"] == list(expected.std)
    saved = checkpoints.load(tmp_path / "run" / "checkpoints" / "latest.pt")["run"]["data_options"]
    assert saved == dict(image_mean=recorded["image_mean"], image_std=recorded["image_std"])

    def recomputed(self):
        raise AssertionError("the statistics were computed again instead of read from the run")
    monkeypatch.setattr(ClassImages, "statistics", recomputed)
    code, out, err = _main(capsys, "train", "--out", "run", "--resume", "--no-progress")
    assert code == 0, err
    code, out, err = _main(capsys, "eval", "--checkpoint", "run", "--tasks", "2", "--no-progress")
    assert code == 0 and "folder test, 2 tasks" in out, err
    code, out, err = _main(capsys, "train", "--config", "run/config.json", "--out", "again", "--stop-at", "0")
    assert code == 130, err
    repeated = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {key: repeated[key] for key in ("dataset", "data_root", "image_mean", "image_std")} == \
        {key: recorded[key] for key in ("dataset", "data_root", "image_mean", "image_std")}
