"""Tasks: batches and a metric by name (``text:pydoc``, ``text:<path>``, ``digits``,
``mad:<task>``). Searchers and the trainer get tasks here with :func:`get_task`."""

from archir.tasks.base import Task, get_task, register_task, task_names

__all__ = ["Task", "get_task", "register_task", "task_names"]
