"""Experiments: one question each, answered with a table (pandas) and figures (matplotlib)."""

from .base import Experiment, Result
from .registry import experiments, get

__all__ = ["Experiment", "Result", "experiments", "get"]
