"""Loaders for the shipped data sets (see each folder's SOURCE.md under `data/`).

Every loader returns plain records (dicts or strings) and raises `MissingDataError`, naming
the file, when a file is absent. Edit cases, from CounterFact or zsRE, share one shape:

    {"case_id", "prompt", "subject", "target_new", "ground_truth",
     "rephrase_prompt", "locality_prompt", "locality_ground_truth", "dataset"}
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from .paths import data_dir


class MissingDataError(FileNotFoundError):
    """A data file the code needs is not in `data/`."""


def _path(*parts: str) -> Path:
    p = data_dir().joinpath(*parts)
    if not p.exists():
        raise MissingDataError(f"missing data file {p} (see data/README.md for where it comes from)")
    return p


def _json(*parts: str):
    return json.loads(_path(*parts).read_text(encoding="utf-8"))


def _jsonl(*parts: str) -> list[dict]:
    return [json.loads(line) for line in _path(*parts).read_text(encoding="utf-8").splitlines() if line.strip()]


def _take(records: list, n: int | None, seed: int) -> list:
    """The first `n` records of a seeded shuffle, in file order (all records when n is None).

    Nested: for one seed, a smaller sample is part of every larger one.
    """
    if n is None or n >= len(records):
        return records
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[:n])]


# ---------------------------------------------------------------- perplexity corpora
ME_PPL_FILES = {50: "ME-PPL_50.json", 1000: "ME-PPL_1k.json", 10000: "ME-PPL.json"}


def load_me_ppl(size: int = 50) -> list[str]:
    """ME-PPL sentences: size 50 (ME-PPL_50), 1000 (ME-PPL_1k) or 10000 (the full set)."""
    if size not in ME_PPL_FILES:
        raise ValueError(f"ME-PPL comes in sizes {sorted(ME_PPL_FILES)}, not {size}")
    return [r["Text"] for r in _json("ME-PPL", ME_PPL_FILES[size])]


def load_wikitext() -> list[str]:
    """WikiText-2 raw test lines (headings and paragraphs), CRLF normalised, empty lines dropped."""
    text = _path("WikiText-2", "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    return [line for line in text.split("\n") if line.strip()]


# ---------------------------------------------------------------- edit cases
COUNTERFACT_SPLITS = ("edit", "train", "val")


def load_counterfact(split: str = "all", n: int | None = None, seed: int = 0) -> list[dict]:
    """CounterFact (21,919 cases in three disjoint files), sorted by case_id."""
    splits = COUNTERFACT_SPLITS if split == "all" else (split,)
    if any(s not in COUNTERFACT_SPLITS for s in splits):
        raise ValueError(f"CounterFact split must be 'all' or one of {COUNTERFACT_SPLITS}, not {split!r}")
    rows = [dict(r, dataset="counterfact") for s in splits for r in _json("CounterFact", f"counterfact-{s}.json")]
    return _take(sorted(rows, key=lambda r: r["case_id"]), n, seed)


def load_zsre(n: int | None = None, seed: int = 0) -> list[dict]:
    """zsRE (MEND format, 1,000 cases) mapped to the edit-case shape; case_id is the row index."""
    rows = []
    for i, r in enumerate(_json("zsRE", "zsre_mend_train-1k.json")):
        rows.append(dict(case_id=i, prompt=r["src"], subject=r["subject"], target_new=r["alt"],
                         ground_truth=r["answers"][0], rephrase_prompt=r["rephrase"],
                         locality_prompt=r["loc"].removeprefix("nq question: "),
                         locality_ground_truth=r["loc_ans"], dataset="zsre"))
    return _take(rows, n, seed)


def load_cases(dataset: str, n: int | None = None, seed: int = 0) -> list[dict]:
    if dataset == "counterfact":
        return load_counterfact("all", n, seed)
    if dataset == "zsre":
        return load_zsre(n, seed)
    raise ValueError(f"unknown edit dataset {dataset!r}; use 'counterfact' or 'zsre'")


def load_known_1000() -> list[dict]:
    return _json("known_1000", "known_1000.json")


# ---------------------------------------------------------------- downstream tasks
def load_piqa(n: int | None = None, seed: int = 0) -> list[dict]:
    """PIQA validation: {"goal", "choices": [sol1, sol2], "label"}."""
    rows = _jsonl("PIQA", "valid.jsonl")
    labels = _path("PIQA", "valid-labels.lst").read_text().split()
    out = [dict(goal=r["goal"], choices=[r["sol1"], r["sol2"]], label=int(y)) for r, y in zip(rows, labels)]
    return _take(out, n, seed)


def load_hellaswag(n: int | None = None, seed: int = 0) -> list[dict]:
    """HellaSwag validation (1k subset): {"activity_label", "ctx_a", "ctx_b", "endings", "label"}."""
    return _take(_jsonl("HellaSwag", "hellaswag_val_1k.jsonl"), n, seed)


def load_mmlu(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """MMLU: {"subject", "question", "choices": [4], "label"} over all 57 subjects."""
    folder = _path("MMLU", split)
    out = []
    for f in sorted(folder.glob(f"*_{split}.csv")):
        subject = f.name.removesuffix(f"_{split}.csv")
        with f.open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                out.append(dict(subject=subject, question=r["question"],
                                choices=[r[f"choice{i}"] for i in range(4)], label=int(r["answer"])))
    return _take(out, n, seed)


def load_lambada(n: int | None = None, seed: int = 0) -> list[str]:
    """LAMBADA test, OpenAI version: passages whose last word is the target."""
    return _take([r["text"] for r in _jsonl("LAMBADA", "lambada_test.jsonl")], n, seed)


def load_nq(n: int | None = None, seed: int = 0) -> list[dict]:
    """Natural Questions (open) dev: {"question", "answer": [aliases]}."""
    return _take(_jsonl("NQ-open", "NQ-open.dev.jsonl"), n, seed)


def load_squad2(n: int | None = None, seed: int = 0) -> list[dict]:
    """SQuAD 2.0 dev, answerable short-answer subset: {"id", "question", "answer", "context"}."""
    rows = _json("SQuAD2", "squad_v2_dev_answerable_subset.json")
    return _take([{k: r[k] for k in ("id", "question", "answer", "context")} for r in rows], n, seed)
