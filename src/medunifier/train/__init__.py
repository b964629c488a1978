"""Training engine: the Accelerate pre-training loop, curriculum stages, checkpoints and metrics."""

from medunifier.train.checkpoint import latest_checkpoint
from medunifier.train.loop import DataError, NonFiniteLossError, TrainResult, train

__all__ = ["DataError", "NonFiniteLossError", "TrainResult", "latest_checkpoint", "train"]
