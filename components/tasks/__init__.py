"""Task types: what a task's labelled rows are, how they are tokenized, which head fine-tunes on
them and how it is scored. A task type is declared once, in its own module, and listed here; the
stages ask `task_type(config.data.task.type)` and name none of them.

Adding a task type = a module exporting `TASK = TaskType(...)` (components/tasks/base.py says what
each field is), its name in `TaskConfig.type` (components/schemas.py) and one line below.
"""

from __future__ import annotations

from components.tasks import answers, classification, entities, generation, translation
from components.tasks.base import IGNORE, TaskType

TASK_TYPES: dict[str, TaskType] = {
    task.name: task for task in (classification.TASK, entities.TASK, answers.TASK, translation.TASK, generation.TASK)
}

__all__ = ["IGNORE", "TASK_TYPES", "TaskType", "task_of_model", "task_type"]


def task_type(name: str) -> TaskType:
    """The task type a config names (`data.task.type`)."""
    return TASK_TYPES[name]


def task_of_model(config) -> TaskType:
    """The task type of a saved model, from its transformers config (its head's class name).

    Raises:
        ValueError: a model with no head ptft fine-tunes.
    """
    for architecture in config.architectures or []:
        for task in TASK_TYPES.values():
            if architecture.endswith(task.architecture):
                return task
    raise ValueError(f"a {config.architectures} model: ptft serves {', '.join(TASK_TYPES)} models")


def load_model_folder(folder: str):
    """(model, tokenizer) of a fine-tuned model saved as a Hugging Face folder, with its task's head."""
    from transformers import AutoConfig, AutoTokenizer

    task = task_of_model(AutoConfig.from_pretrained(folder))
    model = task.model_class().from_pretrained(folder, use_safetensors=True)  # weights are data, never a pickle
    return model, AutoTokenizer.from_pretrained(folder)
