"""What the public API refuses, in one clear ValueError, before any work: images of another dtype
or device than the model's, and epochs that are not whole non-negative numbers."""

import pytest
import torch

import mamlfast
from conftest import random_batch


@pytest.fixture
def learner(small_cfg):
    return mamlfast.MAMLPlusPlus(small_cfg.replace(backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_images_of_another_dtype_than_the_model_are_refused(learner, dtype):
    batch = random_batch(learner.cfg, 2, dtype=dtype)
    message = rf"x_support is {dtype} but the model's parameters are torch\.float32"
    with pytest.raises(ValueError, match=message):
        learner(batch, epoch=0)
    with pytest.raises(ValueError, match=message):
        learner.predict(batch.x_support, batch.y_support, batch.x_query)
    if dtype == torch.float64:
        assert learner.double()(batch, epoch=0).loss.isfinite(), "a model of the images' dtype takes them"


def test_tensors_on_another_device_than_the_model_are_refused(learner):
    batch = random_batch(learner.cfg, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"y_query is on meta but the model is on cpu"):
        learner(mamlfast.TaskBatch(batch.x_support, batch.y_support, batch.x_query, batch.y_query.to("meta")), 0)


@pytest.mark.parametrize("epoch", [-5, 2.5, True, "1"])
def test_epochs_must_be_whole_and_non_negative(learner, epoch):
    with pytest.raises(ValueError, match=rf"epoch={epoch!r}: must be a non-negative integer"):
        learner(random_batch(learner.cfg, 2, dtype=torch.float32), epoch=epoch)
