# Datasets of the local tasks, read from files beside this one (lm-eval resolves `!function` from the yaml's
# folder; a dataset path in the yaml would be read from the current directory instead).
import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def jsonl(name: str, **kwargs) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / "data" / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc(**kwargs):
    return jsonl("zoo_mc.jsonl")


def gen(**kwargs):
    return jsonl("zoo_gen.jsonl")


def paragraphs(**kwargs):
    """The shipped held-out text (data/persuasion_ch1-4.txt), a document per paragraph."""
    text = (HERE.parent / "data" / "persuasion_ch1-4.txt").read_text()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(
        [{"text": p} for p in text.split("\n\n") if p.strip()])})
