"""The hot ops of a task-batched meta-iteration, and the backbone's convolution and pooling, each
one function with a ``backend`` argument."""

from .backends import OP_BACKENDS, BackendDisagrees, BackendUnavailable, availability, resolve
from .batch_norm import task_batch_norm
from .conv import grouped_conv2d
from .lslr import lslr_update, segment_ids_for
from .max_pool import max_pool2x2

__all__ = ["OP_BACKENDS", "BackendDisagrees", "BackendUnavailable", "availability", "resolve",
           "task_batch_norm", "grouped_conv2d", "lslr_update", "segment_ids_for", "max_pool2x2"]
