"""The reference implementation's experiment configs, read as ``mamlfast train`` options.

The MAML++ reference implementation (AntreasAntoniou/HowToTrainYourMAMLPytorch) describes an
experiment by a JSON file of its own keys. ``translate`` maps every key that has a meaning here
to the option of the same meaning, refuses in one line a value that mamlfast cannot honour, and
names in one line the keys that concern only the reference's own machinery. Where the
reference's behaviour for a key is a known defect, mamlfast does what the paper describes and
says so in one line; ``quirks=True`` (``--reference-quirks``) reproduces the reference instead,
where that is possible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from .config import MAMLConfig
from .files import shown

# reference key -> the mamlfast option(s) it sets (docs/reference-code.md)
MAPPED = {
    "num_classes_per_set": "n_way",
    "num_samples_per_class": "k_shot",
    "num_target_samples": "k_query",
    "batch_size": "meta_batch_size",
    "image_height": "image_size",
    "image_width": "image_size",
    "image_channels": "image_channels",
    "cnn_num_filters": "num_filters",
    "num_stages": "num_stages",
    "number_of_training_steps_per_iter": "inner_steps",
    "number_of_evaluation_steps_per_iter": "eval_inner_steps",
    "init_inner_loop_learning_rate": "inner_lr",
    "task_learning_rate": "inner_lr with --reference-quirks",
    "learnable_per_layer_per_step_inner_loop_learning_rate": "learn_inner_lrs",
    "per_step_bn_statistics": "per_step_bn_stats and per_step_bn_weights",
    "multi_step_loss_num_epochs": "msl_epochs",
    "use_multi_step_loss_optimization": "msl",
    "second_order": "second_order",
    "first_order_to_second_order_epoch": "first_order_epochs",
    "meta_learning_rate": "meta_lr",
    "min_learning_rate": "min_meta_lr",
    "total_epochs": "epochs",
    "total_iter_per_epoch": "iters_per_epoch",
    "num_evaluation_tasks": "eval_tasks",
    "dataset_name": "dataset and grad_clip",
    "dataset_path": "data_root",
    "sets_are_pre_split": "dataset",
    "train_seed": "seed",
    "val_seed": "split_seed",
    "train_val_test_split": "split_fractions",
    "max_models_to_save": "keep",
    "experiment_name": "out",
}
# keys mamlfast honours at one value only: key -> (that value, what mamlfast does)
FIXED = {
    "max_pooling": (True, "mamlfast's backbone max-pools after every stage"),
    "conv_padding": (True, "mamlfast's convolutions are padded"),
    "norm_layer": ("batch_norm", "mamlfast's backbone normalises with batch norm"),
    "cnn_blocks_per_stage": (1, "mamlfast's backbone has one convolution per stage"),
    "enable_inner_loop_optimizable_bn_params": (False, "mamlfast adapts only the convolution and head weights "
                                                       "in the inner loop"),
    "learnable_bn_gamma": (True, "mamlfast learns the batch-norm weights"),
    "learnable_bn_beta": (True, "mamlfast learns the batch-norm biases"),
    "learnable_batch_norm_momentum": (False, "mamlfast's batch-norm momentum is 0.1"),
    "dropout_rate_value": (0, "mamlfast's backbone has no dropout"),
    "weight_decay": (0, "mamlfast's meta-optimizer has no weight decay"),
    "indexes_of_folders_indicating_class": ([-3, -2], "mamlfast names a class by the two folders above its "
                                                      "images"),
    "reverse_channels": (False, "mamlfast keeps the images' channel order"),
    "load_from_npz_files": (False, "mamlfast reads image folders and zips"),
    "evaluate_on_test_set_only": (False, "mamlfast eval --checkpoint tests saved models"),
    "evalute_on_test_set_only": (False, "mamlfast eval --checkpoint tests saved models"),
}
# keys that concern only the reference's own machinery, or that it never reads
IGNORED = (
    "gpu_to_use", "num_of_gpus", "num_dataprovider_workers", "samples_per_iter", "load_into_memory",
    "reset_stored_paths", "reset_stored_filepaths", "labels_as_int", "continue_from_epoch",
    "total_epochs_before_pause", "use_gdrive", "name_of_args_json_file", "architecture_name",
    "minimum_per_task_contribution", "train_in_stages",
)
# the reference's model-initialisation seed: mamlfast cannot reproduce its initial weights
INIT_SEED = "seed"
KEYS = frozenset(MAPPED) | frozenset(FIXED) | frozenset(IGNORED) | {INIT_SEED}
# what every reference experiment config names; mamlfast does not guess the reference code's defaults
OPTIONAL = ("task_learning_rate", "max_models_to_save", "experiment_name", "load_from_npz_files",
            "reverse_channels", "evaluate_on_test_set_only", "evalute_on_test_set_only")
REQUIRED = tuple(key for key in (*MAPPED, *FIXED) if key not in OPTIONAL)

REFERENCE_TASK_LR = 0.1  # the reference's inner-rate initialisation, whatever init_inner_loop_learning_rate says
PAPER = MAMLConfig()     # the paper's values where the reference's configs defeat them
NOT_REPRODUCED = ("the initial weights (the reference seeds them with 104), the sequence of tasks, and the "
                  "once-per-epoch steps of the reference's cosine")


@dataclass
class Translation:
    """``mamlfast train`` options (by their names) and the lines to show the user."""

    options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def translate(entries: dict[str, Any], quirks: bool = False, dataset_dir: str | None = None) -> Translation:
    """The options of a reference experiment config ``entries``; ``ValueError`` in one line for a key
    mamlfast cannot honour. ``dataset_dir`` stands for the reference's ``$DATASET_DIR`` (default: the
    environment's)."""
    unknown = sorted(set(entries) - KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {shown(', '.join(unknown))}: not keys of the reference code's experiment "
                         f"configs")
    missing = [key for key in REQUIRED if key not in entries]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}: a reference experiment config names them all "
                         f"(mamlfast does not guess the reference code's defaults)")
    read = _Reader(entries)
    refused = [f"{key}={read.shown(key)}: {does}" for key, (value, does) in FIXED.items()
               if key in entries and not _same(read.canonical(key), value)]
    if refused:
        raise ValueError("; ".join(refused))
    translation = Translation()
    options, notes = translation.options, translation.notes
    dataset = _dataset(read)
    # the reference clips each meta-gradient element to [-10, 10] for a data set named *imagenet*
    options.update(dataset=dataset, grad_clip=10.0 if dataset == "mini-imagenet" else None)
    options["data_root"] = _data_root(read.string("dataset_path"), dataset_dir, notes)
    if read.integer("image_height") != read.integer("image_width"):
        raise ValueError(f"image_height={read.integer('image_height')}, image_width={read.integer('image_width')}: "
                         f"mamlfast's images are square")
    options.update(
        n_way=read.integer("num_classes_per_set"), k_shot=read.integer("num_samples_per_class"),
        k_query=read.integer("num_target_samples"), meta_batch_size=read.integer("batch_size"),
        image_size=read.integer("image_height"), image_channels=read.integer("image_channels"),
        num_filters=read.integer("cnn_num_filters"), num_stages=read.integer("num_stages"),
        inner_steps=read.integer("number_of_training_steps_per_iter"),
        eval_inner_steps=read.integer("number_of_evaluation_steps_per_iter"),
        learn_inner_lrs=read.boolean("learnable_per_layer_per_step_inner_loop_learning_rate"),
        per_step_bn_stats=read.boolean("per_step_bn_statistics"),
        per_step_bn_weights=read.boolean("per_step_bn_statistics"),
        msl=read.boolean("use_multi_step_loss_optimization"), msl_epochs=read.integer("multi_step_loss_num_epochs"),
        second_order=read.boolean("second_order"), meta_lr=read.number("meta_learning_rate"),
        epochs=read.integer("total_epochs"), iters_per_epoch=read.integer("total_iter_per_epoch"),
        eval_tasks=read.integer("num_evaluation_tasks"), seed=read.integer("train_seed"),
        bn_eval="batch",  # the reference normalises every evaluation forward with its batch's statistics
    )
    if "max_models_to_save" in entries:
        options["keep"] = read.integer("max_models_to_save")
    if "experiment_name" in entries:
        options["out"] = str(Path("runs") / _experiment_name(read))
    if dataset == "omniglot":
        options.update(class_split="reference", split_seed=read.integer("val_seed"),
                       split_fractions=read.numbers("train_val_test_split"))
    quirk_lines = _defects(read, options, quirks, notes)
    if quirks:
        done = "; ".join(quirk_lines) or "none of its defects concern this config"
        notes.append(f"--reference-quirks: {done}; not reproduced: {NOT_REPRODUCED}")
    elif options["min_meta_lr"] < options["meta_lr"]:
        notes.append("the meta learning rate's cosine: mamlfast steps it every iteration, the reference code once "
                     "per epoch (not reproduced)")
    if INIT_SEED in entries:
        notes.append(f"{INIT_SEED}={read.shown(INIT_SEED)}: the reference's initialisation seed; mamlfast draws the "
                     f"initial weights from train_seed (the reference's cannot be reproduced)")
    ignored = [key for key in IGNORED if key in entries]
    if ignored:
        notes.append(f"ignored (the reference code's own machinery, or never read by it): {', '.join(ignored)}")
    return translation


def _defects(read: _Reader, options: dict, quirks: bool, notes: list[str]) -> list[str]:
    """Set the options where the reference's behaviour is a known defect: as the paper has it, with a
    note, or with ``quirks`` as the reference does it. Returns what the quirks reproduce."""
    reproduced = []
    plus_plus = options["msl"] or options["learn_inner_lrs"] or options["per_step_bn_stats"]

    init_lr, task_lr = read.number("init_inner_loop_learning_rate"), REFERENCE_TASK_LR
    if "task_learning_rate" in read.entries:
        task_lr = read.number("task_learning_rate")
    options["inner_lr"] = task_lr if quirks else init_lr
    if init_lr != task_lr:
        if quirks:
            reproduced.append(f"the inner learning rates start at task_learning_rate={task_lr}")
        else:
            notes.append(f"init_inner_loop_learning_rate={init_lr}: mamlfast starts the inner learning rates "
                         f"there; the reference code ignores it and starts at task_learning_rate={task_lr} "
                         f"(--reference-quirks does the same)")

    second_after = read.integer("first_order_to_second_order_epoch")
    options["first_order_epochs"] = max(second_after + 1, 0)  # the reference: second order once epoch > it
    if second_after < 0 and options["second_order"] and plus_plus:
        if quirks:
            reproduced.append("second order from the first epoch")
        else:
            options["first_order_epochs"] = PAPER.first_order_epochs
            notes.append(f"first_order_to_second_order_epoch={second_after}: the reference code then trains second "
                         f"order from the start, without derivative-order annealing; mamlfast trains first order "
                         f"for the first {PAPER.first_order_epochs} epochs as the paper does (--reference-quirks: "
                         f"second order from the start)")

    meta_lr, min_lr = options["meta_lr"], read.number("min_learning_rate")
    if min_lr > meta_lr:
        raise ValueError(f"min_learning_rate={min_lr} exceeds meta_learning_rate={meta_lr}: mamlfast's cosine "
                         f"anneals the meta learning rate downwards")
    options["min_meta_lr"] = min_lr
    if min_lr == meta_lr and plus_plus and meta_lr > PAPER.min_meta_lr:
        if quirks:
            reproduced.append("a constant meta learning rate")
        else:
            options["min_meta_lr"] = PAPER.min_meta_lr
            notes.append(f"min_learning_rate={min_lr} equals meta_learning_rate: the reference code's cosine then "
                         f"keeps the rate constant; mamlfast anneals it to {PAPER.min_meta_lr} as the paper does "
                         f"(--reference-quirks keeps it constant)")

    if options["dataset"] == "omniglot":
        options["pixels"] = "reference" if quirks else "mamlfast"
        if quirks:
            reproduced.append("binary Omniglot pixels with dark ink")
        else:
            notes.append("Omniglot pixels: mamlfast smooths the images as it shrinks them and makes the ink bright; "
                         "the reference code keeps them binary with dark ink (--reference-quirks does the same)")
    return reproduced


def _dataset(read: _Reader) -> str:
    """The data set, told apart by its name as the reference code does, and checked against its split."""
    name = read.string("dataset_name")
    pre_split = read.boolean("sets_are_pre_split")
    if "omniglot" in name:
        if pre_split:
            raise ValueError("sets_are_pre_split=true: mamlfast splits Omniglot's classes itself, as the reference "
                             "does with sets_are_pre_split=false")
        return "omniglot"
    if "imagenet" in name:
        if not pre_split:
            raise ValueError("sets_are_pre_split=false: mamlfast reads mini-ImageNet's classes from its train, val "
                             "and test folders, as the reference does with sets_are_pre_split=true")
        return "mini-imagenet"
    raise ValueError(f"dataset_name={read.shown('dataset_name')}: mamlfast reads Omniglot and mini-ImageNet (a name "
                     f"containing 'omniglot' or 'imagenet', as the reference code tells them apart)")


def _data_root(path: str, dataset_dir: str | None, notes: list[str]) -> str:
    """``dataset_path`` as the reference resolves it: under ``$DATASET_DIR``."""
    dataset_dir = dataset_dir if dataset_dir is not None else os.environ.get("DATASET_DIR")
    if dataset_dir is None and not Path(path).is_absolute():
        notes.append(f"dataset_path={shown(repr(path))} lies under $DATASET_DIR for the reference code; DATASET_DIR "
                     f"is not "
                     f"set, so mamlfast reads {Path(path).resolve()} (or pass --data-root)")
    return str(Path(dataset_dir or ".", path).resolve())


def _experiment_name(read: _Reader) -> str:
    """``experiment_name``, the folder of the run under runs/ as the reference code names it, checked
    to stay there."""
    name = read.string("experiment_name")
    parts = PurePath(name).parts
    if not parts or PurePath(name).is_absolute() or ".." in parts or "\0" in name:
        raise ValueError(f"experiment_name={read.shown('experiment_name')}: must name a folder inside runs/ "
                         f"(not empty, not absolute, no '..')")
    return name


def _same(value: Any, expected: Any) -> bool:
    """Equal, and not merely because Python equates True with 1."""
    return isinstance(value, bool) == isinstance(expected, bool) and value == expected


class _Reader:
    """Typed values of a reference config; a wrong type is a one-line ``ValueError`` naming the key.

    Booleans may be written as the strings "true" and "false" (any case), as the reference reads them.
    """

    def __init__(self, entries: dict[str, Any]):
        self.entries = entries

    def shown(self, key: str) -> str:
        return shown(json.dumps(self.entries[key]))

    def canonical(self, key: str) -> Any:
        """The value as the reference reads it: "true" and "false" strings as booleans."""
        value = self.entries[key]
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value

    def boolean(self, key: str) -> bool:
        value = self.canonical(key)
        if not isinstance(value, bool):
            raise ValueError(f"{key}={self.shown(key)}: must be true or false")
        return value

    def integer(self, key: str) -> int:
        value = self.entries[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}={self.shown(key)}: must be an integer")
        return value

    def number(self, key: str) -> float:
        value = self.entries[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}={self.shown(key)}: must be a number")
        return float(value)

    def numbers(self, key: str) -> list[float]:
        value = self.entries[key]
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise ValueError(f"{key}={self.shown(key)}: must be a list of numbers")
        return [float(v) for v in value]

    def string(self, key: str) -> str:
        value = self.entries[key]
        if not isinstance(value, str):
            raise ValueError(f"{key}={self.shown(key)}: must be a string")
        return value
