"""Datasets of the tiny local lm-eval tasks: JSONL files next to this one, read wherever lm-eval runs
(a task's `custom_dataset`), so the tasks need no download and no Hugging Face cache."""
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _read(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs) -> datasets.DatasetDict:
    """10 made-up sentence completions, 4 choices each, the first one right."""
    return _read("tiny_mc.jsonl")


def load_text(**kwargs) -> datasets.DatasetDict:
    """3 short texts (code and prose) for rolling log-likelihood."""
    return _read("tiny_text.jsonl")
