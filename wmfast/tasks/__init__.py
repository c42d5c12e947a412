"""Training tasks: the Task protocol and its registry (task), and the built-in tasks, registered on import:
"compression" (the ST-Transformer on tokens; compression), "sampling" (LoRA flow matching of the Wan world
model; sampling) and "toy" (a tiny LM that exercises the loop; toy).

A task owns everything model-specific (model, loss, data, FLOPs); the trainer (wmfast.train) imports tasks,
models never do. Importing this package is cheap: models (and diffusers) are imported when a task is built.
"""
from wmfast.tasks import compression, sampling, toy  # noqa: F401 - registers the built-in tasks
from wmfast.tasks.task import TASKS, Task, make_task, param_groups, register_task

__all__ = ["TASKS", "Task", "make_task", "param_groups", "register_task"]
