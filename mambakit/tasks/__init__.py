"""Synthetic tasks (selective copying, induction heads, multi-query associative recall) and their training loop."""
from mambakit.tasks.synthetic import IGNORE, TASKS, AssociativeRecall, InductionHeads, SelectiveCopying

__all__ = ["IGNORE", "TASKS", "AssociativeRecall", "InductionHeads", "SelectiveCopying"]
