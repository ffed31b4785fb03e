"""Models as layer sequences, partition points, FrontNet/BackNet splits, and the model zoo."""

from .layers import BackNet, FrontNet, LayeredModel, PartitionPoint

__all__ = ["LayeredModel", "FrontNet", "BackNet", "PartitionPoint"]
