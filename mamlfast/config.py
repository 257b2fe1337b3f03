"""MAMLConfig: every setting of a MAML++ run, the paper's presets, and their validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .files import shown

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda", "loop")
BN_EVAL_MODES = ("batch", "running")
VARIANTS = ("maml++", "maml", "fomaml")

_OMNIGLOT = dict(
    image_channels=1, image_size=28, num_filters=64, meta_batch_size=8,
    inner_lr=0.1, msl_epochs=10, k_query=1, grad_clip=None,
)
# The reference code clips every mini-ImageNet meta-gradient element to [-10, 10].
_MINI_IMAGENET = dict(
    image_channels=3, image_size=84, num_filters=48, meta_batch_size=2,
    inner_lr=0.01, msl_epochs=15, k_query=15, grad_clip=10.0,
)
PRESETS: dict[str, dict[str, Any]] = {
    "omniglot-5w1s": dict(_OMNIGLOT, n_way=5, k_shot=1),
    "omniglot-5w5s": dict(_OMNIGLOT, n_way=5, k_shot=5),
    "omniglot-20w1s": dict(_OMNIGLOT, n_way=20, k_shot=1),
    "omniglot-20w5s": dict(_OMNIGLOT, n_way=20, k_shot=5),
    "mini-imagenet-5w1s": dict(_MINI_IMAGENET, n_way=5, k_shot=1),
    "mini-imagenet-5w5s": dict(_MINI_IMAGENET, n_way=5, k_shot=5),
}

# Plain MAML (Finn et al. 2017) is MAML++ with its five techniques switched off:
# one fixed inner rate, one set of BN weights and statistics, final-step loss only,
# second order from the start, and a constant meta learning rate.
_PLAIN_MAML = dict(
    learn_inner_lrs=False, per_step_bn_weights=False, per_step_bn_stats=False,
    msl=False, first_order_epochs=0,
)
_VARIANT_OVERRIDES: dict[str, dict[str, Any]] = {
    "maml++": {},
    "maml": dict(_PLAIN_MAML, second_order=True),
    "fomaml": dict(_PLAIN_MAML, second_order=False),
}


# Upper bounds of the sizes, far above any published few-shot setting: beyond them a run fits in no
# machine's memory (MAX_ACTIVATION bounds the sizes' product), or would count its iterations
# inexactly (at most 10**15, within float64's whole numbers).
MAXIMUM = dict(n_way=10_000, k_shot=10_000, k_query=10_000, image_channels=1_024, image_size=4_096,
               num_filters=4_096, inner_steps=1_000, eval_inner_steps=1_000, meta_batch_size=65_536,
               epochs=1_000_000, iters_per_epoch=1_000_000_000, eval_tasks=1_000_000)
MAX_ACTIVATION = 2**40


@dataclass(frozen=True)
class MAMLConfig:
    """All settings of a MAML++ run. Defaults are the paper's Omniglot 5-way 1-shot MAML++.

    Build one from a preset with ``MAMLConfig.preset("omniglot-20w1s")``; any field can be
    overridden there or here. Invalid values raise ``ValueError`` naming the field.
    """

    # task shape
    n_way: int = 5
    k_shot: int = 1
    k_query: int = 1
    image_channels: int = 1
    image_size: int = 28
    # backbone
    num_filters: int = 64
    num_stages: int = 4
    # inner loop
    inner_steps: int = 5
    eval_inner_steps: int = 5
    inner_lr: float = 0.1
    learn_inner_lrs: bool = True          # LSLR
    per_step_bn_weights: bool = True      # BNWB
    per_step_bn_stats: bool = True        # BNRS
    bn_eval: str = "batch"                # normalisation at evaluation: "batch" or "running"
    # outer loop
    msl: bool = True                      # multi-step loss
    msl_epochs: int = 10
    second_order: bool = True
    first_order_epochs: int = 50          # DA: first-order gradients before this epoch
    meta_lr: float = 1e-3
    min_meta_lr: float = 1e-5             # CA: cosine annealing to this value
    meta_batch_size: int = 8
    epochs: int = 100
    iters_per_epoch: int = 500
    eval_tasks: int = 600
    grad_clip: float | None = None        # clip each meta-gradient element to [-grad_clip, grad_clip]
    # execution
    backend: str = "auto"
    cuda_graphs: bool = True
    recompute: bool | str = False         # second order: recompute inner steps in the backward; or "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def preset(cls, name: str, variant: str = "maml++", **overrides: Any) -> "MAMLConfig":
        """The paper's configuration ``name`` (see ``PRESETS``) as ``variant``, with overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {shown(repr(name))}; choose one of {', '.join(PRESETS)}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {shown(repr(variant))}; choose one of {', '.join(VARIANTS)}")
        fields = {**PRESETS[name], **_VARIANT_OVERRIDES[variant]}
        if variant != "maml++":
            fields["min_meta_lr"] = overrides.get("meta_lr", cls.meta_lr)
        return cls.from_dict({**fields, **overrides})

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> "MAMLConfig":
        """Build from a mapping of field names, rejecting names that are not fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown MAMLConfig field(s): {shown(', '.join(map(str, unknown)))}")
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "MAMLConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def differences(self, other: "MAMLConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as name -> (self's value, other's value)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


def _validate(cfg: MAMLConfig) -> None:
    def fail(field: str, message: str) -> None:
        raise ValueError(f"MAMLConfig.{field}={shown(repr(getattr(cfg, field)))}: {message}")

    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            fail(f.name, "must be an integer")
        if f.type == "bool" and not isinstance(value, bool):
            fail(f.name, "must be True or False")
        if f.type == "float" and not _is_number(value):
            fail(f.name, "must be a number")
        if f.type == "float | None" and value is not None and not _is_number(value):
            fail(f.name, "must be None or a number")

    minimum = dict(n_way=2, k_shot=1, k_query=1, image_channels=1, num_filters=1, num_stages=1,
                   inner_steps=1, eval_inner_steps=1, meta_batch_size=1, epochs=1,
                   iters_per_epoch=1, eval_tasks=1, msl_epochs=0, first_order_epochs=0)
    for field, low in minimum.items():
        if getattr(cfg, field) < low:
            fail(field, f"must be at least {low}")
    for field, high in MAXIMUM.items():
        if getattr(cfg, field) > high:
            fail(field, f"must be at most {high}")
    activation = cfg.meta_batch_size * cfg.n_way * max(cfg.k_shot, cfg.k_query) * cfg.num_filters * cfg.image_size ** 2
    if activation > MAX_ACTIVATION:
        raise ValueError(f"MAMLConfig: one activation of a meta-batch would hold {activation} values (meta_batch_size "
                         f"{cfg.meta_batch_size} x n_way {cfg.n_way} x max(k_shot, k_query) "
                         f"{max(cfg.k_shot, cfg.k_query)} x num_filters {cfg.num_filters} x image_size^2 "
                         f"{cfg.image_size ** 2}), more than the 2**40 (4 TiB of float32) that fit in any machine")
    if not 0 <= cfg.seed < 2**64:
        fail("seed", "must be between 0 and 2**64 - 1")
    for field in ("inner_lr", "meta_lr", "min_meta_lr"):
        if not (getattr(cfg, field) > 0 and math.isfinite(getattr(cfg, field))):
            fail(field, "must be a positive finite number")
    if cfg.min_meta_lr > cfg.meta_lr:
        fail("min_meta_lr", f"must not exceed meta_lr={cfg.meta_lr}")
    if cfg.grad_clip is not None and not (cfg.grad_clip > 0 and math.isfinite(cfg.grad_clip)):
        fail("grad_clip", "must be None or a positive finite number")
    if cfg.image_size >> cfg.num_stages < 1:
        fail("image_size", f"is too small for {cfg.num_stages} stages of 2x2 max-pooling")
    if cfg.bn_eval not in BN_EVAL_MODES:
        fail("bn_eval", f"must be one of {', '.join(BN_EVAL_MODES)}")
    if cfg.backend not in BACKENDS:
        fail("backend", f"must be one of {', '.join(BACKENDS)}")
    if not (isinstance(cfg.recompute, bool) or cfg.recompute == "auto"):
        fail("recompute", "must be False, True or 'auto'")
    per_step = [name for name in ("learn_inner_lrs", "per_step_bn_weights", "per_step_bn_stats")
                if getattr(cfg, name)]
    if cfg.eval_inner_steps > cfg.inner_steps and per_step:
        fail("eval_inner_steps", f"exceeds inner_steps={cfg.inner_steps}, but {', '.join(per_step)} "
             "keep(s) values for the training steps only")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
