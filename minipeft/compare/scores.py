"""The scores of one method's greedy answers to the held-out records, per method and base (answer_scores):

    exact match       share of records whose generated answer (stripped) equals the expected one
    per task          the same within each task (a demo task has one fixed instruction: demo_data.TASKS)
    answer chars      mean length in characters of the generated answers (stripped), beside the expected mean
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from ..demo_data import TASKS

TASK_OF_INSTRUCTION = {instruction: task for task, instruction in TASKS.items()}


def task_of(instruction: str) -> str:
    return TASK_OF_INSTRUCTION.get(instruction, "other")


def answer_scores(records: Sequence, texts: Sequence[str]) -> dict:
    """Per-task accuracy and answer lengths of greedy generations `texts` for `records` (data.Record)."""
    if not texts:
        return {"per_task": {}, "answer_chars_mean": None, "expected_chars_mean": None}
    per_task: Dict[str, List[bool]] = {}
    for record, text in zip(records, texts):
        per_task.setdefault(task_of(record.instruction), []).append(text.strip() == record.output.strip())
    return {"per_task": {task: sum(hits) / len(hits) for task, hits in sorted(per_task.items())},
            "answer_chars_mean": sum(len(t.strip()) for t in texts) / len(texts),
            "expected_chars_mean": sum(len(r.output.strip()) for r in records[:len(texts)]) / len(texts)}
