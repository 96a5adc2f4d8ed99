"""A dataset's content checked against the task it is imported for, before anything is stored.

The record format alone accepts any reference; for a classification task a reference that is not one of its
labels would score as a certain miss in every evaluation (and teach nonsense in training). So at import a label
task's references must be among its labels (matched case-insensitively and stored in the label's own spelling,
as the feedback endpoint does), and its records must be one text to classify (an `input`, or user turns only):
a conversation with assistant turns is a chat example, not a label example. Every bad line is named; a file with
any is refused whole.
"""

from __future__ import annotations

from tuneloop.challenger_sets.records import Example, raise_all
from tuneloop.config import TaskConfig
from tuneloop.errors import DatasetError


def check_for_task(numbered: list[tuple[int, Example]], task_name: str, task: TaskConfig,
                   source: str) -> list[Example]:
    """The examples, references normalised to the task's labels; DatasetError naming every line that does not fit."""
    if task.kind != "classification":
        return [example for _, example in numbered]
    labels = {label.casefold(): label for label in task.labels}
    errors: list[DatasetError] = []
    checked: list[Example] = []
    for line, example in numbered:
        label = labels.get(example.reference.strip().casefold())
        if label is None:
            errors.append(DatasetError(f"'{example.reference[:60]}' is not a label of task '{task_name}'; expected "
                                       f"one of {task.labels}", path=source, line=line, field="reference"))
        if example.messages and any(m.role == "assistant" for m in example.messages):
            errors.append(DatasetError(f"task '{task_name}' classifies one text; give 'input' (or user turns "
                                       "only), not a conversation with assistant turns", path=source, line=line,
                                       field="messages"))
        if label is not None:
            checked.append(example.model_copy(update={"reference": label}))
    if errors:
        raise_all(errors, source)
    return checked
