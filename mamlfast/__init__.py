"""mamlfast: MAML++ (Antoniou et al., ICLR 2019), task-batched and fused, with the paper's exact maths."""

try:
    import torch  # noqa: F401
except ImportError:
    raise ImportError("mamlfast needs PyTorch, which it never installs itself: install torch first "
                      "(https://pytorch.org), then mamlfast") from None

from . import learner_check  # noqa: F401  (adds one meta-iteration to every fused backend's self-check)
from .config import PRESETS, MAMLConfig
from .learner import MAMLPlusPlus
from .tasks import MetaOutput, TaskBatch

__version__ = "0.1.0"
__all__ = ["MAMLConfig", "MAMLPlusPlus", "MetaOutput", "PRESETS", "TaskBatch", "__version__"]
