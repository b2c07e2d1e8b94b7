"""The shipped data sets (see each folder's SOURCE.md under `data/`), loaded through HF `datasets`.

`load_dataset_<name>` returns the whole set as a `datasets.Dataset`: read from the local files by the
`datasets` builders (json, text) into Arrow files cached under ``cache_dir()/datasets`` (keyed by the
files' path and modification time), memory-mapped, in file order, with the folder's SOURCE.md in
``info.description``. Nothing touches a hub. The downstream sets keep the columns of the hub
versions that lm-evaluation-harness reads (PIQA goal/sol1/sol2/label, MMLU question/subject/choices/
answer, SQuAD answers.text), so lm-eval task configs read them unchanged.

`load_<name>` returns plain records (dicts or strings) built on those, for the callers that index
or mutate them. Edit cases, from CounterFact or zsRE, share one shape:

    {"case_id", "prompt", "subject", "target_new", "ground_truth",
     "rephrase_prompt", "locality_prompt", "locality_ground_truth", "dataset"}

Samples (`n`, `seed`) are the first n of a seeded shuffle, kept in file order, so that for one seed
a smaller sample is part of every larger one. A missing file raises `MissingDataError`, an empty or
unreadable one `DataError`; both name the file.
"""
from __future__ import annotations

import csv
import os
import random
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402  (after the offline switches, which datasets reads at import)

from .paths import cache_dir, data_dir  # noqa: E402


class MissingDataError(FileNotFoundError):
    """A data file the code needs is not in `data/`."""


class DataError(ValueError):
    """A data file that is there but empty or unreadable (the message names it)."""


def _path(*parts: str) -> Path:
    p = data_dir().joinpath(*parts)
    if not p.exists():
        raise MissingDataError(f"missing data file {p} (see data/README.md for where it comes from)")
    return p


@contextmanager
def _quiet():
    """No 'Generating split' bars from `datasets` (restored afterwards)."""
    was_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.utils.enable_progress_bars()


def _provenance(folder: str) -> str:
    source = data_dir() / folder / "SOURCE.md"
    return source.read_text(encoding="utf-8") if source.exists() else ""


def _check_rows(ds: datasets.Dataset, paths: list[Path]) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"data file {', '.join(map(str, paths))} holds no records")
    return ds


def _builder(builder: str, folder: str, *files: str, columns: tuple[str, ...] = (), **config) -> datasets.Dataset:
    """`datasets.load_dataset(builder)` over data/<folder>/<files>, cached under cache_dir(), with provenance;
    DataError naming the files when one of `columns` is missing."""
    paths = [_path(folder, f) for f in files]
    for p in paths:
        if p.stat().st_size == 0:
            raise DataError(f"data file {p} is empty")
    try:
        with _quiet():
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                       cache_dir=str(cache_dir() / "datasets"), **config)
    except Exception as e:  # noqa: BLE001 - an error inside datasets does not name the file
        for p in paths:
            if p.read_text(encoding="utf-8", errors="replace").strip() in ("[]", "{}"):
                raise DataError(f"data file {p} holds no records") from e
        raise DataError(f"cannot read {', '.join(map(str, paths))} as {builder}: {type(e).__name__}: {e}") from e
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"data file {', '.join(map(str, paths))} lacks column(s) {missing}; it has {ds.column_names}")
    ds.info.description = _provenance(folder)
    return _check_rows(ds, paths)


def _generated(folder: str, rows, paths: list[Path], features: datasets.Features) -> datasets.Dataset:
    """`Dataset.from_generator(rows)` for files no builder reads as they are (cached like `_builder`)."""
    stamp = repr([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])  # a str: lists are shards
    with _quiet():
        ds = datasets.Dataset.from_generator(rows, gen_kwargs=dict(stamp=stamp), features=features,
                                             cache_dir=str(cache_dir() / "datasets"))
    ds.info.description = _provenance(folder)
    return _check_rows(ds, paths)


def sample_indices(total: int, n: int | None, seed: int = 0) -> list[int]:
    """Indices of the first `n` of a seeded shuffle of range(total), in increasing order (all when n
    is None or n >= total). Nested: for one seed, a smaller sample is part of every larger one."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None (all records) or a number of records >= 0, not {n!r}")
    if n is None or n >= total:
        return list(range(total))
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return sorted(order[:n])


def _take(records: list, n: int | None, seed: int) -> list:
    """The records at `sample_indices(len(records), n, seed)`."""
    return [records[i] for i in sample_indices(len(records), n, seed)]


def sample(ds: datasets.Dataset, n: int | None, seed: int = 0) -> datasets.Dataset:
    """The rows of `ds` at `sample_indices(len(ds), n, seed)` (a view, nothing copied)."""
    return ds.select(sample_indices(len(ds), n, seed))


# ---------------------------------------------------------------- perplexity corpora
ME_PPL_FILES = {50: "ME-PPL_50.json", 1000: "ME-PPL_1k.json", 10000: "ME-PPL.json"}


def load_dataset_me_ppl(size: int = 50) -> datasets.Dataset:
    """ME-PPL (columns Corpus, Text): size 50 (ME-PPL_50), 1000 (ME-PPL_1k) or 10000 (the full set)."""
    if size not in ME_PPL_FILES:
        raise ValueError(f"ME-PPL comes in sizes {sorted(ME_PPL_FILES)}, not {size}")
    return _builder("json", "ME-PPL", ME_PPL_FILES[size], columns=("Text",))


def load_me_ppl(size: int = 50) -> list[str]:
    """ME-PPL sentences: size 50 (ME-PPL_50), 1000 (ME-PPL_1k) or 10000 (the full set)."""
    return load_dataset_me_ppl(size)["Text"]


def load_dataset_wikitext() -> datasets.Dataset:
    """WikiText-2 raw test (column text): one row per line, CRLF normalised, empty lines dropped."""
    path = _path("WikiText-2", "wiki.test.raw")

    def rows(stamp):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        yield from ({"text": line} for line in text.split("\n") if line.strip())

    return _generated("WikiText-2", rows, [path], datasets.Features(text=datasets.Value("string")))


def load_wikitext() -> list[str]:
    """WikiText-2 raw test lines (headings and paragraphs), CRLF normalised, empty lines dropped."""
    return load_dataset_wikitext()["text"]


# ---------------------------------------------------------------- edit cases
COUNTERFACT_SPLITS = ("edit", "train", "val")
EDIT_CASE_FIELDS = ("case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                    "locality_prompt", "locality_ground_truth")
ZSRE_FILE = "zsre_mend_train-1k.json"


def load_dataset_counterfact(split: str = "all") -> datasets.Dataset:
    """CounterFact (21,919 cases in three disjoint files, EasyEdit format), sorted by case_id."""
    splits = COUNTERFACT_SPLITS if split == "all" else (split,)
    if any(s not in COUNTERFACT_SPLITS for s in splits):
        raise ValueError(f"CounterFact split must be 'all' or one of {COUNTERFACT_SPLITS}, not {split!r}")
    return _builder("json", "CounterFact", *(f"counterfact-{s}.json" for s in splits),
                    columns=EDIT_CASE_FIELDS).sort("case_id")


def load_counterfact(split: str = "all", n: int | None = None, seed: int = 0) -> list[dict]:
    """CounterFact cases, sorted by case_id (a seeded sample of `n` of them)."""
    ds = load_dataset_counterfact(split)
    return [dict(r, dataset="counterfact") for r in sample(ds, n, seed).to_list()]


def load_dataset_zsre() -> datasets.Dataset:
    """zsRE (MEND format: src, alt, answers, rephrase, loc, loc_ans, ...; 1,000 cases)."""
    return _builder("json", "zsRE", ZSRE_FILE,
                    columns=("src", "subject", "alt", "answers", "rephrase", "loc", "loc_ans"))


def load_zsre(n: int | None = None, seed: int = 0) -> list[dict]:
    """zsRE mapped to the edit-case shape; case_id is the row index. DataError for a case without an answer."""
    ds = load_dataset_zsre()
    idx = sample_indices(len(ds), n, seed)
    rows = ds.select(idx).to_list()
    empty = [i for i, r in zip(idx, rows) if not r["answers"]]
    if empty:
        raise DataError(f"data file {_path('zsRE', ZSRE_FILE)}: case(s) {empty[:10]} have no answer (answers: [])")
    return [dict(case_id=i, prompt=r["src"], subject=r["subject"], target_new=r["alt"],
                 ground_truth=r["answers"][0], rephrase_prompt=r["rephrase"],
                 locality_prompt=r["loc"].removeprefix("nq question: "),
                 locality_ground_truth=r["loc_ans"], dataset="zsre")
            for i, r in zip(idx, rows)]


def load_cases(dataset: str, n: int | None = None, seed: int = 0) -> list[dict]:
    if dataset == "counterfact":
        return load_counterfact("all", n, seed)
    if dataset == "zsre":
        return load_zsre(n, seed)
    raise ValueError(f"unknown edit dataset {dataset!r}; use 'counterfact' or 'zsre'")


def load_dataset_known_1000() -> datasets.Dataset:
    return _builder("json", "known_1000", "known_1000.json")


# ---------------------------------------------------------------- downstream tasks
def load_dataset_piqa() -> datasets.Dataset:
    """PIQA validation: goal, sol1, sol2 and label (from valid-labels.lst, line-aligned)."""
    ds = _builder("json", "PIQA", "valid.jsonl", columns=("goal", "sol1", "sol2"))
    path = _path("PIQA", "valid-labels.lst")
    labels = [int(y) for y in path.read_text().split()]
    if len(labels) != len(ds):
        raise DataError(f"{path} has {len(labels)} labels for {len(ds)} questions")
    return ds.add_column("label", labels)


def load_piqa(n: int | None = None, seed: int = 0) -> list[dict]:
    """PIQA validation: {"goal", "choices": [sol1, sol2], "label"}."""
    return [dict(goal=r["goal"], choices=[r["sol1"], r["sol2"]], label=r["label"])
            for r in sample(load_dataset_piqa(), n, seed).to_list()]


def load_dataset_hellaswag() -> datasets.Dataset:
    """HellaSwag validation, a random 1k subset (original schema: activity_label, ctx_a, ctx_b, endings, label)."""
    return _builder("json", "HellaSwag", "hellaswag_val_1k.jsonl",
                    columns=("activity_label", "ctx_a", "ctx_b", "endings", "label"))


def load_hellaswag(n: int | None = None, seed: int = 0) -> list[dict]:
    return sample(load_dataset_hellaswag(), n, seed).to_list()


MMLU_FEATURES = datasets.Features(question=datasets.Value("string"), subject=datasets.Value("string"),
                                  choices=datasets.Sequence(datasets.Value("string")),
                                  answer=datasets.Value("int64"))


def load_dataset_mmlu(split: str = "test") -> datasets.Dataset:
    """MMLU over all 57 subjects, by subject (the columns of cais/mmlu: question, subject, choices, answer)."""
    folder = _path("MMLU", split)
    files = sorted(folder.glob(f"*_{split}.csv"))
    if not files:
        raise MissingDataError(f"no MMLU files {folder}/*_{split}.csv")

    def rows(stamp):
        for f in files:
            with f.open(newline="", encoding="utf-8") as fh:
                for r in csv.DictReader(fh):
                    yield dict(question=r["question"], subject=f.name.removesuffix(f"_{split}.csv"),
                               choices=[r[f"choice{i}"] for i in range(4)], answer=int(r["answer"]))

    return _generated("MMLU", rows, files, MMLU_FEATURES)


def load_mmlu(split: str = "test", n: int | None = None, seed: int = 0) -> list[dict]:
    """MMLU: {"subject", "question", "choices": [4], "label"} over all 57 subjects."""
    return [dict(subject=r["subject"], question=r["question"], choices=r["choices"], label=r["answer"])
            for r in sample(load_dataset_mmlu(split), n, seed).to_list()]


def load_dataset_lambada() -> datasets.Dataset:
    """LAMBADA test, OpenAI version (column text): passages whose last word is the target."""
    return _builder("json", "LAMBADA", "lambada_test.jsonl", columns=("text",))


def load_lambada(n: int | None = None, seed: int = 0) -> list[str]:
    return sample(load_dataset_lambada(), n, seed)["text"]


def load_dataset_nq() -> datasets.Dataset:
    """Natural Questions (open) dev: question, answer (a list of aliases)."""
    return _builder("json", "NQ-open", "NQ-open.dev.jsonl", columns=("question", "answer"))


def load_nq(n: int | None = None, seed: int = 0) -> list[dict]:
    """Natural Questions (open) dev: {"question", "answer": [aliases]}."""
    return sample(load_dataset_nq(), n, seed).to_list()


def load_dataset_squad2() -> datasets.Dataset:
    """SQuAD 2.0 dev, answerable short-answer subset: id, question, context, answer, and
    answers = {"text": [answer], "answer_start": [start]} as in the hub version."""
    ds = _builder("json", "SQuAD2", "squad_v2_dev_answerable_subset.json",
                  columns=("id", "question", "context", "answer", "answer_span"))
    answers = [{"text": [a], "answer_start": [span[0]]} for a, span in zip(ds["answer"], ds["answer_span"])]
    return ds.add_column("answers", answers)


def load_squad2(n: int | None = None, seed: int = 0) -> list[dict]:
    """SQuAD 2.0 dev, answerable short-answer subset: {"id", "question", "answer", "context"}."""
    return [{k: r[k] for k in ("id", "question", "answer", "context")}
            for r in sample(load_dataset_squad2(), n, seed).to_list()]
