"""Evaluation: every ensemble from one pass over the fixed tasks, and batch sizes per device."""

import pytest
import torch

import mamlfast
from mamlfast.data import ClassImages, TaskSampler
from mamlfast.train import FixedTasks, eval_chunk

TINY = dict(image_size=16, num_filters=4, inner_steps=2, eval_inner_steps=2, eval_tasks=7, backend="torch")


def _sampler(cfg, classes=12, per_class=4):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 1, cfg.image_size, cfg.image_size), generator=generator,
                           dtype=torch.uint8)
    split = ClassImages(images, torch.full((classes,), per_class), [f"class{c}" for c in range(classes)])
    return TaskSampler(split, cfg, name="test", mean=(0.5,), std=(0.25,), rotate=False)


def _learners(cfg, count):
    learners = []
    for seed in range(count):
        torch.manual_seed(seed)
        learners.append(mamlfast.MAMLPlusPlus(cfg).eval())
    return learners


def _count_predictions(learners):
    calls = [0] * len(learners)
    for index, learner in enumerate(learners):
        def predict(*tensors, index=index, predict=learner.predict):
            calls[index] += 1
            return predict(*tensors)
        learner.predict = predict
    return calls


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_one_pass_gives_every_ensemble_its_accuracies(chunk):
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s", **TINY)
    sampler = _sampler(cfg)
    learners = _learners(cfg, 3)
    indices, rotations = sampler.fixed_tasks(cfg.eval_tasks)
    batch = sampler.batch(indices, rotations)
    with torch.no_grad():
        logits = [learner.predict(batch.x_support, batch.y_support, batch.x_query) for learner in learners]
    expected_best = (logits[0].argmax(-1) == batch.y_query).float().mean(1)
    expected_ensemble = (sum(logits).argmax(-1) == batch.y_query).float().mean(1)

    calls = _count_predictions(learners)
    best, ensemble = FixedTasks(sampler, cfg.eval_tasks, chunk).accuracies(learners[:1], learners)
    batches = -(-cfg.eval_tasks // chunk)
    assert calls == [batches] * 3, "each learner adapts once to each batch of tasks"
    assert torch.equal(best, expected_best)
    assert torch.equal(ensemble, expected_ensemble)
    assert not torch.equal(best, ensemble), "the test needs an ensemble that differs from its best model"


IMAGE_BYTES = 64 * 28 * 28 * 4  # one Omniglot image's first-stage activation, float32


def test_cpu_batches_keep_an_activation_within_the_cache_budget():
    per_task = 5 * IMAGE_BYTES
    assert eval_chunk(mamlfast.MAMLConfig.preset("omniglot-5w1s"), "cpu") == 16 * 2**20 // per_task == 16
    assert eval_chunk(mamlfast.MAMLConfig.preset("omniglot-20w1s"), "cpu") == 4
    # too big for the budget even alone: one task at a time
    assert eval_chunk(mamlfast.MAMLConfig.preset("omniglot-20w5s"), "cpu") == 1
    assert eval_chunk(mamlfast.MAMLConfig.preset("mini-imagenet-5w1s"), "cpu") == 1
    # spread evenly: 40 tasks in batches of 14, 14, 12 rather than 16, 16, 8; never more than there are
    assert eval_chunk(mamlfast.MAMLConfig.preset("omniglot-5w1s", eval_tasks=40), "cpu") == 14
    assert eval_chunk(mamlfast.MAMLConfig.preset("omniglot-5w1s", eval_tasks=5), "cpu") == 5


def test_gpu_batches_fill_the_card_within_a_quarter_of_its_free_memory(monkeypatch):
    free = {"bytes": 80 * 2**30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    cfg = mamlfast.MAMLConfig.preset("omniglot-5w1s")
    # plenty of memory: 128 MiB of first-stage activation per batch (133 tasks), spread as 5 x 120
    assert eval_chunk(cfg, "cuda") == 120
    # 100 MiB free: a quarter of it holds 3 tasks' adaptation (7 activations per support image)
    free["bytes"] = 100 * 2**20
    assert eval_chunk(cfg, "cuda") == 25 * 2**20 // (7 * 5 * IMAGE_BYTES) == 3
    free["bytes"] = 2**20
    assert eval_chunk(cfg, "cuda") == 1
