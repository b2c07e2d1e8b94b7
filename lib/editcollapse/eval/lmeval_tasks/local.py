"""Data and helpers for the lm-eval task configs in this folder (`!function local.<name>`).

The data come from `editcollapse.data` (the files shipped in `data/`, through HF `datasets`; no
hub); the preprocessing and metric functions are lm-eval's own, re-exported here so that the YAML
files can name them.
"""
from datasets import DatasetDict
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401
from lm_eval.tasks.mlqa.utils import process_docs as squad_process_docs  # noqa: F401
from lm_eval.tasks.mlqa.utils import process_results_en as squad_process_results  # noqa: F401

from editcollapse import data


def piqa(**_) -> DatasetDict:
    return DatasetDict(validation=data.load_dataset_piqa())


def hellaswag(**_) -> DatasetDict:
    return DatasetDict(validation=data.load_dataset_hellaswag())


def mmlu(**_) -> DatasetDict:
    return DatasetDict(test=data.load_dataset_mmlu("test"))


def lambada(**_) -> DatasetDict:
    return DatasetDict(test=data.load_dataset_lambada())


def nq(shots: int = 0, **_) -> DatasetDict:
    """The first `shots` dev questions are the few-shot examples (split "train", as only dev is
    shipped); the others are scored (split "validation")."""
    ds = data.load_dataset_nq()
    return DatasetDict(train=ds.select(range(shots)), validation=ds.select(range(shots, len(ds))))


def squad2(**_) -> DatasetDict:
    return DatasetDict(validation=data.load_dataset_squad2())
