"""Drop-in for users of the reference implementation: its experiment configs (--config), its dataset
folders, its class split; and every run's own config.json."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import mamlfast
from fixtures import make_mini_imagenet, make_omniglot
from mamlfast import checkpoints, cli, config_file, reference_config
from mamlfast.data import DatasetError, load_dataset
from mamlfast.data.omniglot import ClassSplit, default_split, list_classes, load_omniglot

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED = REPOSITORY.parent / "shared"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DATASET_DIR", raising=False)


# The reference's Omniglot MAML++ 5-way 1-shot experiment, seed 0, key for key as its config generator writes it.
OMNIGLOT = {
    "batch_size": 8, "image_height": 28, "image_width": 28, "image_channels": 1, "gpu_to_use": 0,
    "num_dataprovider_workers": 4, "max_models_to_save": 5, "dataset_name": "omniglot", "dataset_path": "omniglot",
    "reset_stored_paths": False, "experiment_name": "omniglot_1_8_0.1_64_5_0", "train_seed": 0, "val_seed": 0,
    "train_val_test_split": [0.70918052988, 0.03080714725, 0.2606284658],
    "indexes_of_folders_indicating_class": [-3, -2], "load_from_npz_files": False, "sets_are_pre_split": False,
    "load_into_memory": True, "init_inner_loop_learning_rate": 0.1, "train_in_stages": False,
    "multi_step_loss_num_epochs": 10, "minimum_per_task_contribution": 0.01, "num_evaluation_tasks": 600,
    "learnable_per_layer_per_step_inner_loop_learning_rate": True, "enable_inner_loop_optimizable_bn_params": False,
    "total_epochs": 100, "total_iter_per_epoch": 500, "continue_from_epoch": -2, "evaluate_on_test_set_only": False,
    "max_pooling": True, "per_step_bn_statistics": True, "learnable_batch_norm_momentum": False,
    "evalute_on_test_set_only": False, "learnable_bn_gamma": True, "learnable_bn_beta": True, "weight_decay": 0.0,
    "dropout_rate_value": 0.0, "min_learning_rate": 0.00001, "meta_learning_rate": 0.001,
    "total_epochs_before_pause": 100, "first_order_to_second_order_epoch": -1, "norm_layer": "batch_norm",
    "cnn_num_filters": 64, "num_stages": 4, "conv_padding": True, "number_of_training_steps_per_iter": 5,
    "number_of_evaluation_steps_per_iter": 5, "cnn_blocks_per_stage": 1, "num_classes_per_set": 5,
    "num_samples_per_class": 1, "num_target_samples": 1, "second_order": True,
    "use_multi_step_loss_optimization": True,
}
# Its mini-ImageNet MAML++ 5-way 1-shot experiment, seed 0.
MINI_IMAGENET = {
    **{k: v for k, v in OMNIGLOT.items() if k not in ("load_from_npz_files", "train_in_stages")},
    "batch_size": 2, "image_height": 84, "image_width": 84, "image_channels": 3, "dataset_name": "mini_imagenet",
    "dataset_path": "mini_imagenet", "experiment_name": "mini-imagenet_1_2_0.01_48_5_0",
    "sets_are_pre_split": True, "train_val_test_split": [0.64, 0.16, 0.20], "multi_step_loss_num_epochs": 15,
    "init_inner_loop_learning_rate": 0.01, "min_learning_rate": 0.001, "total_epochs_before_pause": 101,
    "cnn_num_filters": 48, "num_target_samples": 15,
}
# Its plain MAML experiments switch the three per-step techniques off.
PLAIN = {"learnable_per_layer_per_step_inner_loop_learning_rate": False, "per_step_bn_statistics": False,
         "use_multi_step_loss_optimization": False}

OMNIGLOT_MAMLPP = dict(
    n_way=5, k_shot=1, k_query=1, image_channels=1, image_size=28, num_filters=64, num_stages=4, inner_steps=5,
    eval_inner_steps=5, inner_lr=0.1, learn_inner_lrs=True, per_step_bn_weights=True, per_step_bn_stats=True,
    bn_eval="batch", msl=True, msl_epochs=10, second_order=True, first_order_epochs=50, meta_lr=1e-3,
    min_meta_lr=1e-5, meta_batch_size=8, epochs=100, iters_per_epoch=500, eval_tasks=600, grad_clip=None, seed=0)
MINI_MAMLPP = dict(
    OMNIGLOT_MAMLPP, k_query=15, image_channels=3, image_size=84, num_filters=48, inner_lr=0.01, msl_epochs=15,
    meta_batch_size=2, grad_clip=10.0)
PLAIN_FIELDS = dict(learn_inner_lrs=False, per_step_bn_weights=False, per_step_bn_stats=False, msl=False,
                    first_order_epochs=0)
OMNIGLOT_RUN = dict(dataset="omniglot", class_split="reference", split_seed=0,
                    split_fractions=[0.70918052988, 0.03080714725, 0.2606284658], keep=5)

# The mapping table: reference config, --reference-quirks, the MAMLConfig fields and run options it gives.
TABLE = {
    "Omniglot MAML++ 5w1s": (OMNIGLOT, False, OMNIGLOT_MAMLPP,
                             dict(OMNIGLOT_RUN, pixels="mamlfast", out="runs/omniglot_1_8_0.1_64_5_0")),
    "Omniglot MAML++ 5w1s, quirks": (OMNIGLOT, True, dict(OMNIGLOT_MAMLPP, first_order_epochs=0),
                                     dict(OMNIGLOT_RUN, pixels="reference")),
    "Omniglot MAML 20w5s seed 2": (
        dict(OMNIGLOT, **PLAIN, num_classes_per_set=20, num_samples_per_class=5, train_seed=2,
             experiment_name="omniglot_5_8_0.1_64_20_2"),
        False, dict(OMNIGLOT_MAMLPP, **PLAIN_FIELDS, n_way=20, k_shot=5, seed=2),
        dict(OMNIGLOT_RUN, pixels="mamlfast", out="runs/omniglot_5_8_0.1_64_20_2")),
    "Omniglot, val_seed 3, DA after epoch 9": (
        dict(OMNIGLOT, val_seed=3, first_order_to_second_order_epoch=9), False,
        dict(OMNIGLOT_MAMLPP, first_order_epochs=10), dict(OMNIGLOT_RUN, split_seed=3)),
    "mini-ImageNet MAML++ 5w1s": (MINI_IMAGENET, False, MINI_MAMLPP,
                                  dict(dataset="mini-imagenet", keep=5, out="runs/mini-imagenet_1_2_0.01_48_5_0")),
    "mini-ImageNet MAML++ 5w5s seed 1, quirks": (
        dict(MINI_IMAGENET, num_samples_per_class=5, train_seed=1), True,
        dict(MINI_MAMLPP, k_shot=5, seed=1, inner_lr=0.1, first_order_epochs=0, min_meta_lr=1e-3),
        dict(dataset="mini-imagenet")),
    "mini-ImageNet MAML 5w1s": (dict(MINI_IMAGENET, **PLAIN), False,
                                dict(MINI_MAMLPP, **PLAIN_FIELDS, min_meta_lr=1e-3), dict(dataset="mini-imagenet")),
    "mini-ImageNet MAML, quirks, task_learning_rate 0.4": (
        dict(MINI_IMAGENET, **PLAIN, task_learning_rate=0.4), True,
        dict(MINI_MAMLPP, **PLAIN_FIELDS, min_meta_lr=1e-3, inner_lr=0.4), dict(dataset="mini-imagenet")),
}
EXECUTION_FIELDS = set(checkpoints.EXECUTION_FIELDS)  # how to compute, not what: no reference key sets them


@pytest.mark.parametrize("name", TABLE)
def test_reference_configs_give_the_mapping_tables_config(name):
    entries, quirks, fields, run = TABLE[name]
    options = reference_config.translate(entries, quirks=quirks, dataset_dir="/datasets").options
    mapped = {f for f in options if f in mamlfast.MAMLConfig.__dataclass_fields__}
    assert set(mamlfast.MAMLConfig.__dataclass_fields__) - mapped == EXECUTION_FIELDS, "every computing field is set"
    assert mamlfast.MAMLConfig(**{f: options[f] for f in mapped}) == mamlfast.MAMLConfig(**fields)
    assert {k: options[k] for k in run} == run
    assert options["data_root"] == str(Path("/datasets", entries["dataset_path"]))


def test_defects_are_named_in_one_line_each_with_what_mamlfast_does():
    notes = reference_config.translate(MINI_IMAGENET, dataset_dir="/d").notes
    assert any(n.startswith("init_inner_loop_learning_rate=0.01: mamlfast starts the inner learning rates there")
               for n in notes)
    assert any(n.startswith("first_order_to_second_order_epoch=-1:") and "first order for the first 50 epochs" in n
               for n in notes)
    assert any(n.startswith("min_learning_rate=0.001 equals meta_learning_rate") and "anneals it to 1e-05" in n
               for n in notes)
    quirks = reference_config.translate(MINI_IMAGENET, quirks=True, dataset_dir="/d").notes
    line = next(n for n in quirks if n.startswith("--reference-quirks:"))
    assert "task_learning_rate=0.1" in line and "second order from the first epoch" in line
    assert "not reproduced: the initial weights" in line
    plain = reference_config.translate(dict(OMNIGLOT, **PLAIN), dataset_dir="/d").notes
    assert not any(n.startswith(("first_order_to", "min_learning_rate", "init_inner")) for n in plain), \
        "plain MAML is second order with a constant rate by design, not by a defect"


def test_machinery_keys_are_named_in_one_logged_line():
    notes = reference_config.translate(dict(OMNIGLOT, samples_per_iter=1, seed=104), dataset_dir="/d").notes
    ignored = [n for n in notes if n.startswith("ignored")]
    assert len(ignored) == 1
    for key in ("gpu_to_use", "num_dataprovider_workers", "continue_from_epoch", "samples_per_iter"):
        assert key in ignored[0]
    assert any(n.startswith("seed=104: the reference's initialisation seed") for n in notes)


# One unsupported value per key that mamlfast honours at one value only.
UNSUPPORTED = {"max_pooling": False, "conv_padding": False, "norm_layer": "layer_norm", "cnn_blocks_per_stage": 2,
               "enable_inner_loop_optimizable_bn_params": True, "learnable_bn_gamma": False,
               "learnable_bn_beta": "False", "learnable_batch_norm_momentum": True, "dropout_rate_value": 0.3,
               "weight_decay": 1e-4, "indexes_of_folders_indicating_class": [-2, -3], "reverse_channels": True,
               "load_from_npz_files": True, "evaluate_on_test_set_only": True, "evalute_on_test_set_only": True}


def test_every_fixed_key_is_tested():
    assert set(UNSUPPORTED) == set(reference_config.FIXED)


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_a_value_mamlfast_cannot_honour_is_refused_in_one_line_naming_the_key(key):
    with pytest.raises(ValueError) as error:
        reference_config.translate(dict(OMNIGLOT, **{key: UNSUPPORTED[key]}))
    message = str(error.value)
    assert message.startswith(f"{key}={json.dumps(UNSUPPORTED[key])}: mamlfast") and "\n" not in message


@pytest.mark.parametrize("changes, message", [
    (dict(dataset_name="cifar100"), "dataset_name=\"cifar100\": mamlfast reads Omniglot and mini-ImageNet"),
    (dict(sets_are_pre_split=True), "sets_are_pre_split=true: mamlfast splits Omniglot's classes itself"),
    (dict(image_width=32), "image_height=28, image_width=32: mamlfast's images are square"),
    (dict(min_learning_rate=0.01), "min_learning_rate=0.01 exceeds meta_learning_rate=0.001"),
    (dict(batch_size="8"), "batch_size=\"8\": must be an integer"),
    (dict(second_order="yes"), "second_order=\"yes\": must be true or false"),
    (dict(meta_learning_rate=True), "meta_learning_rate=true: must be a number"),
    (dict(train_val_test_split=0.7), "train_val_test_split=0.7: must be a list of numbers"),
    (dict(dataset_path=3), "dataset_path=3: must be a string"),
    (dict(bogus=1, other=2), "unknown key(s) bogus, other: not keys of the reference code's experiment configs"),
    *[(dict(experiment_name=name), f"experiment_name={json.dumps(name)}: must name a folder inside runs/")
      for name in ("../x", "a/../../x", "/tmp/x", "", ".")],
])
def test_bad_values_and_keys_get_one_line(changes, message):
    with pytest.raises(ValueError) as error:
        reference_config.translate(dict(OMNIGLOT, **changes))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("key", reference_config.REQUIRED)
def test_a_missing_key_is_named(key):
    entries = {k: v for k, v in OMNIGLOT.items() if k != key}
    with pytest.raises(ValueError, match=rf"missing key\(s\) {key}: a reference experiment config names them all"):
        reference_config.translate(entries)


def test_mini_imagenet_must_be_read_from_its_split_folders():
    with pytest.raises(ValueError, match="sets_are_pre_split=false: mamlfast reads mini-ImageNet's classes"):
        reference_config.translate(dict(MINI_IMAGENET, sets_are_pre_split=False))


def test_booleans_may_be_strings_as_the_reference_reads_them():
    options = reference_config.translate(dict(OMNIGLOT, second_order="False", max_pooling="TRUE")).options
    assert options["second_order"] is False


def test_dataset_path_lies_under_dataset_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DATASET_DIR", str(tmp_path))
    assert reference_config.translate(OMNIGLOT).options["data_root"] == str(tmp_path / "omniglot")
    monkeypatch.delenv("DATASET_DIR")
    monkeypatch.chdir(tmp_path)
    translation = reference_config.translate(OMNIGLOT)
    assert translation.options["data_root"] == str(tmp_path / "omniglot")
    assert any("DATASET_DIR is not set" in n for n in translation.notes)


def _write(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries))
    return path


def test_config_files_are_told_apart_by_their_keys(tmp_path):
    reference = config_file.read(_write(tmp_path / "ref.json", OMNIGLOT))
    assert reference.reference and reference.options["n_way"] == 5
    ours = config_file.read(_write(tmp_path / "ours.json", {"n_way": 20, "second_order": False, "dataset": "omniglot"}))
    assert not ours.reference and ours.options == {"n_way": 20, "second_order": False, "dataset": "omniglot"}


@pytest.mark.parametrize("content, quirks, message", [
    ('{"n_way": 5, "num_classes_per_set": 5}', False,
     "mixes mamlfast options (n_way) with keys of the reference code's experiment configs (num_classes_per_set)"),
    ('{"n_wya": 5}', False, "unknown option(s) n_wya: a mamlfast config holds `mamlfast train` options"),
    ('{"n_way": "5"}', False, 'n_way="5": must be an integer'),
    ('{"grad_clip": "none"}', False, 'grad_clip="none": must be a number or null'),
    ('{"split_fractions": [0.7, "a"]}', False, "split_fractions=[0.7, \"a\"]: must be a list of numbers"),
    ('{"n_way": 5}', True, "--reference-quirks applies to the reference code's experiment configs"),
    ('{"n_way": 5', False, "is not valid JSON"),
    ('[1, 2]', False, "must hold a JSON object of options, not list"),
    ('{"n_way": "%s"}' % ("x" * 10**6), False, 'n_way="xxxxxxxx'),
    ('{"%s": 1}' % ("x" * 10**6), False, "unknown option(s) xxxxxxxx"),
    (json.dumps(dict(OMNIGLOT, dataset_name="x" * 10**6)), False, 'dataset_name="xxxxxxxx'),
])
def test_bad_config_files_get_one_line_naming_the_file(tmp_path, content, quirks, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        config_file.read(path, quirks)
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)
    assert len(str(error.value)) < 500, "values cut to a readable length"


# -- the reference's dataset folders and class split -------------------------------------------------------


def _alphabets_layout(parts: Path, root: Path) -> Path:
    """The Omniglot at ``parts`` (images_background, images_evaluation) as one folder of all alphabets."""
    for part in ("images_background", "images_evaluation"):
        for alphabet in (parts / part).iterdir():
            shutil.copytree(alphabet, root / alphabet.name)
    return root


@pytest.mark.skipif(not (SHARED / "reference/omniglot_reference_split.json").is_file()
                    or not (SHARED / "datasets/omniglot/images_background.zip").is_file(),
                    reason="../shared holds neither the reference split nor the Omniglot zips")
def test_reference_split_of_the_real_omniglot_is_the_reference_codes():
    expected = json.loads((SHARED / "reference/omniglot_reference_split.json").read_text())
    classes, _ = list_classes(SHARED / "datasets/omniglot")
    names = [name for name, _ in classes]
    indices = ClassSplit("reference", seed=0).indices(names)
    for split in ("train", "val", "test"):
        assert [names[i] for i in indices[split]] == expected[split], split
    assert len(expected["train"]) == 1150 and len(expected["val"]) == 50 and len(expected["test"]) == 423


def test_one_folder_of_all_alphabets_reads_as_the_two_parts(tmp_path):
    parts = make_omniglot(tmp_path / "parts", alphabets=(("Alpha", 12), ("Beta", 9)), evaluation=(("Gamma", 11),))
    alphabets = _alphabets_layout(parts, tmp_path / "alphabets")
    assert default_split(parts) == ClassSplit("mamlfast") and default_split(alphabets) == ClassSplit("reference")
    seed_1 = ClassSplit("reference", seed=1)
    from_parts = load_omniglot(parts, image_size=16, class_split=seed_1)
    from_alphabets = load_omniglot(alphabets, image_size=16, class_split=seed_1)
    for split in ("train", "val", "test"):
        assert from_parts[split].names == from_alphabets[split].names
        assert torch.equal(from_parts[split].images, from_alphabets[split].images)
    assert [len(from_alphabets[s].names) for s in ("train", "val", "test")] == [22, 1, 9]  # int(0.709 * 32), ...
    by_default = load_omniglot(alphabets, image_size=16)
    seed_0 = load_omniglot(parts, image_size=16, class_split=ClassSplit("reference", seed=0))
    assert all(by_default[s].names == seed_0[s].names for s in seed_0), "the reference's split, val_seed 0"
    assert by_default["train"].names != from_parts["train"].names, "the seed chooses the classes"


def test_reference_split_is_the_reference_loaders_algorithm():
    """Names sorted, shuffled by RandomState seeded with RandomState(val_seed).randint(1, 999999),
    cut at int() of the cumulative fractions; the order of the names given does not matter."""
    import numpy as np
    names = [f"A{a}/character{c:02d}" for a in range(7) for c in range(1, 15)]
    scrambled = names[::-1]
    split = ClassSplit("reference", seed=5, fractions=(0.5, 0.2, 0.3))
    order = np.arange(len(names), dtype=np.int32)
    np.random.RandomState(np.random.RandomState(5).randint(1, 999999)).shuffle(order)
    expected = [sorted(names)[i] for i in order]
    got = {k: [scrambled[i] for i in v] for k, v in split.indices(scrambled).items()}
    assert got == {"train": expected[:49], "val": expected[49:68], "test": expected[68:]}


@pytest.mark.parametrize("fractions, seed", [((0.7,), 0), ((0.8, 0.3), 0), ((0.5, -0.1, 0.6), 0), ((0.7, 0.1), -1),
                                             ((float("nan"), 0.1), 0), ((0.7, float("inf")), 0)])
def test_bad_class_splits_are_refused(fractions, seed):
    with pytest.raises(DatasetError, match="the class split's"):
        ClassSplit("reference", seed, fractions)


def test_reference_pixels_stay_binary_with_dark_ink(tmp_path):
    root = make_omniglot(tmp_path / "o", alphabets=(("Alpha", 4),), evaluation=(("Gamma", 4),))
    binary = load_omniglot(root, image_size=16, pixels="reference")["test"].images
    smooth = load_omniglot(root, image_size=16)["test"].images
    assert set(binary.unique().tolist()) == {0, 255} and binary.float().mean() > 128, "ink 0 on 255"
    assert len(smooth.unique()) > 2 and smooth.float().mean() < 128, "smoothed, ink bright"


def test_load_dataset_records_how_it_read_the_data(tmp_path):
    root = make_omniglot(tmp_path / "o")
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", image_size=16)
    dataset = load_dataset("omniglot", cfg, root)
    assert dataset.options == dict(class_split="mamlfast", split_seed=0, pixels="mamlfast")
    again = load_dataset("omniglot", cfg, root, class_split="reference", split_seed=2, pixels="reference")
    assert again.options == dict(class_split="reference", split_seed=2, pixels="reference",
                                 split_fractions=[0.70918052988, 0.03080714725, 0.2606284658])
    assert load_dataset("omniglot", cfg, root, **again.options).splits["val"].names == again.splits["val"].names


# -- the command line ----------------------------------------------------------------------------------------

TINY = ["--image-size", "16", "--num-filters", "4", "--inner-steps", "2", "--eval-inner-steps", "2",
        "--meta-batch-size", "2", "--epochs", "1", "--iters-per-epoch", "2", "--eval-tasks", "2", "--log-every", "1",
        "--no-progress"]


def _train(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_reference_config_trains_on_the_reference_layout_and_its_run_repeats(tmp_path, capsys, monkeypatch):
    datasets = tmp_path / "datasets"
    _alphabets_layout(make_omniglot(tmp_path / "parts"), datasets / "omniglot")
    monkeypatch.setenv("DATASET_DIR", str(datasets))
    monkeypatch.chdir(tmp_path)
    config = _write(tmp_path / "omniglot_maml++.json", OMNIGLOT)
    code, out, err = _train(capsys, "--config", str(config), "--n-way", "2", *TINY)
    assert code == 0, err
    assert "mamlfast: first_order_to_second_order_epoch=-1:" in out and "mamlfast: ignored (" in out
    run = tmp_path / "runs" / "omniglot_1_8_0.1_64_5_0"  # after its experiment_name
    written = json.loads((run / "config.json").read_text())
    assert written["n_way"] == 2 and written["k_shot"] == 1 and written["first_order_epochs"] == 50, \
        "the command line overrides the file"
    assert written["data_root"] == str(datasets / "omniglot") and written["class_split"] == "reference"
    assert config_file.read(run / "config.json").options == written, "a run's config.json reads back as itself"
    checkpoint = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert checkpoint["run"]["data_options"]["class_split"] == "reference"

    code, _, err = _train(capsys, "--config", str(run / "config.json"), "--out", "again", "--no-progress")
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == written
    assert (tmp_path / "again" / "metrics.jsonl").read_text().count('"loss"') == 2
    losses = [[r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
              for path in (run, tmp_path / "again")]
    assert losses[0] == losses[1], "the same config, the same tasks and weights"

    assert cli.main(["eval", "--checkpoint", str(run), "--tasks", "2", "--no-progress"]) == 0
    resumed = cli.main(["train", "--out", str(run), "--resume", "--class-split", "mamlfast", "--no-progress"])
    assert resumed == 2 and "read its data with" in capsys.readouterr().err


def test_a_reference_mini_imagenet_config_trains_on_its_layout(tmp_path, capsys, monkeypatch):
    make_mini_imagenet(tmp_path / "mini_imagenet", images_per_class=16, size=16)
    monkeypatch.setenv("DATASET_DIR", str(tmp_path))
    config = _write(tmp_path / "mini.json", MINI_IMAGENET)
    code, out, err = _train(capsys, "--config", str(config), "--reference-quirks", "--out", str(tmp_path / "run"),
                            *TINY)
    assert code == 0, err
    assert "mamlfast: --reference-quirks: the inner learning rates start at task_learning_rate=0.1" in out
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (written["dataset"], written["k_query"], written["grad_clip"]) == ("mini-imagenet", 15, 10.0)
    assert (written["inner_lr"], written["first_order_epochs"], written["min_meta_lr"]) == (0.1, 0, 1e-3)


@pytest.mark.parametrize("args, message", [
    (["--reference-quirks"], "--reference-quirks applies to a reference experiment config: give it with --config"),
    (["--config", "nowhere.json"], "config file nowhere.json does not exist"),
    (["--config", "max_pooling.json"], "max_pooling.json: max_pooling=false: mamlfast's backbone max-pools"),
])
def test_command_line_mistakes_get_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "max_pooling.json", dict(OMNIGLOT, max_pooling=False))
    code, _, err = _train(capsys, *args, "--no-progress")
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_an_experiment_name_outside_runs_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    config = _write(tmp_path / "escape.json", dict(OMNIGLOT, experiment_name="../../x"))
    code, _, err = _train(capsys, "--config", str(config), "--no-progress")
    assert code == 2 and err.count("\n") == 1 and 'experiment_name="../../x": must name a folder inside runs/' in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["escape.json", "work"]
    assert not any((tmp_path / "work").iterdir())


def test_an_out_folder_through_a_missing_one_is_written_where_it_says(tmp_path, capsys, monkeypatch):
    """--out runs/../x before runs/ exists: the lock and the files land in one folder, x."""
    monkeypatch.chdir(tmp_path)
    code, _, err = _train(capsys, "--out", "runs/../x", *TINY)
    assert code == 0, err
    assert (tmp_path / "x" / "summary.json").is_file() and (tmp_path / "x" / ".lock").is_file()


def test_the_docs_map_every_reference_key():
    page = (REPOSITORY / "docs" / "reference-code.md").read_text()
    missing = [key for key in reference_config.KEYS if f"`{key}`" not in page]
    assert not missing, f"docs/reference-code.md does not mention {missing}"


def test_a_config_file_takes_recompute_as_true_false_or_auto(tmp_path):
    path = tmp_path / "config.json"
    for value in (True, False, "auto"):
        path.write_text(json.dumps(dict(recompute=value)))
        assert config_file.read(path).options["recompute"] == value
    path.write_text(json.dumps(dict(recompute=3)))
    with pytest.raises(ValueError, match="recompute=3: must be true, false or a string"):
        config_file.read(path)
