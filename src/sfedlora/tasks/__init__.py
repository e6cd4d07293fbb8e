"""Kinds of task (classification, regression, causal LM) behind one :class:`Task` interface."""

from . import causal_lm, sequence  # noqa: F401  (each registers its kinds in TASKS)
from .base import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task"]
