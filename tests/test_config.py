import pytest

from mamlfast import PRESETS, MAMLConfig
from mamlfast.config import MAXIMUM


def test_paper_presets():
    omniglot = MAMLConfig.preset("omniglot-20w1s")
    assert (omniglot.n_way, omniglot.k_shot, omniglot.image_size, omniglot.image_channels) == (20, 1, 28, 1)
    assert (omniglot.num_filters, omniglot.meta_batch_size, omniglot.inner_lr, omniglot.msl_epochs) == (64, 8, 0.1, 10)
    mini = MAMLConfig.preset("mini-imagenet-5w5s")
    assert (mini.n_way, mini.k_shot, mini.image_size, mini.image_channels) == (5, 5, 84, 3)
    assert (mini.num_filters, mini.meta_batch_size, mini.inner_lr, mini.msl_epochs) == (48, 2, 0.01, 15)
    for name in PRESETS:
        cfg = MAMLConfig.preset(name)
        assert (cfg.inner_steps, cfg.epochs, cfg.iters_per_epoch, cfg.eval_tasks) == (5, 100, 500, 600)
        assert (cfg.first_order_epochs, cfg.meta_lr, cfg.min_meta_lr) == (50, 1e-3, 1e-5)
        assert cfg.msl and cfg.second_order and cfg.learn_inner_lrs
        assert cfg.per_step_bn_weights and cfg.per_step_bn_stats


def test_variants_switch_the_techniques_off():
    maml = MAMLConfig.preset("omniglot-5w1s", variant="maml")
    assert not (maml.learn_inner_lrs or maml.per_step_bn_weights or maml.per_step_bn_stats or maml.msl)
    assert maml.second_order and maml.first_order_epochs == 0
    assert maml.min_meta_lr == maml.meta_lr
    assert maml.inner_lr == 0.1 and maml.num_filters == 64
    fomaml = MAMLConfig.preset("mini-imagenet-5w1s", variant="fomaml", meta_lr=3e-4)
    assert not fomaml.second_order and fomaml.min_meta_lr == 3e-4 and fomaml.inner_lr == 0.01


def test_overrides_and_round_trip():
    cfg = MAMLConfig.preset("omniglot-5w5s", meta_batch_size=4, backend="torch")
    assert cfg.meta_batch_size == 4 and cfg.backend == "torch" and cfg.k_shot == 5
    assert MAMLConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.differences(cfg.replace(seed=3)) == {"seed": (0, 3)}


@pytest.mark.parametrize("overrides, field", [
    (dict(n_way=1), "n_way"),
    (dict(k_shot=0), "k_shot"),
    (dict(k_query=0), "k_query"),
    (dict(inner_steps=0), "inner_steps"),
    (dict(eval_inner_steps=6), "eval_inner_steps"),
    (dict(inner_lr=0.0), "inner_lr"),
    (dict(meta_lr=-1.0), "meta_lr"),
    (dict(min_meta_lr=1.0), "min_meta_lr"),
    (dict(meta_batch_size=0), "meta_batch_size"),
    (dict(image_size=8), "image_size"),
    (dict(backend="tpu"), "backend"),
    (dict(bn_eval="moving"), "bn_eval"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(n_way=5.0), "n_way"),
    (dict(msl="yes"), "msl"),
    (dict(inner_lr=float("inf")), "inner_lr"),
    (dict(meta_lr=float("inf")), "meta_lr"),
    (dict(meta_lr=float("nan")), "meta_lr"),
    (dict(grad_clip=float("inf")), "grad_clip"),
    (dict(grad_clip="1"), "grad_clip"),
    (dict(grad_clip=True), "grad_clip"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**64), "seed"),
    *[(dict(**{field: 2**62}), field) for field in MAXIMUM],
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"MAMLConfig\.{field}="):
        MAMLConfig.preset("omniglot-5w1s", **overrides)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown preset 'omniglot-30w1s'"):
        MAMLConfig.preset("omniglot-30w1s")
    with pytest.raises(ValueError, match="unknown variant 'reptile'"):
        MAMLConfig.preset("omniglot-5w1s", variant="reptile")
    with pytest.raises(ValueError, match="unknown MAMLConfig field.*inner_step\\b"):
        MAMLConfig.preset("omniglot-5w1s", inner_step=3)


def test_sizes_have_bounds_that_say_what_is_sensible():
    for field, high in MAXIMUM.items():  # each bound itself is allowed, the other sizes small
        small = dict(meta_batch_size=1, inner_steps=high if field == "eval_inner_steps" else 5)
        MAMLConfig(**{**small, field: high})
    with pytest.raises(ValueError, match=r"MAMLConfig.image_size=4611686018427387904: must be at most 4096"):
        MAMLConfig(image_size=2**62)
    with pytest.raises(ValueError, match=r"one activation of a meta-batch would hold \d+ values \(meta_batch_size "
                                         r"65536 x n_way"):
        MAMLConfig(meta_batch_size=65_536, n_way=10_000, num_filters=4_096)


def test_values_in_messages_are_cut_to_a_readable_length():
    with pytest.raises(ValueError) as error:
        MAMLConfig(backend="x" * 10**6)
    assert len(str(error.value)) < 300 and "... (1000002 characters): must be one of auto" in str(error.value)
    with pytest.raises(ValueError) as error:
        MAMLConfig.from_dict({"y" * 10**6: 1})
    assert len(str(error.value)) < 300


def test_plain_maml_may_evaluate_with_more_steps():
    assert MAMLConfig.preset("omniglot-5w1s", variant="maml", eval_inner_steps=10).eval_inner_steps == 10
