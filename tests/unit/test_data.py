"""Data loaders: HF Datasets from the shipped files (cached, memory-mapped, with provenance), the list
loaders equal to a direct read of the files, nested seeded samples, and clear errors."""
import csv
import json
import os
import random
from pathlib import Path

import datasets
import pytest

from editcollapse import data
from editcollapse.paths import cache_dir, data_dir

DATASETS = {"me_ppl": ("ME-PPL", data.load_dataset_me_ppl), "wikitext": ("WikiText-2", data.load_dataset_wikitext),
            "counterfact": ("CounterFact", data.load_dataset_counterfact), "zsre": ("zsRE", data.load_dataset_zsre),
            "known_1000": ("known_1000", data.load_dataset_known_1000), "piqa": ("PIQA", data.load_dataset_piqa),
            "hellaswag": ("HellaSwag", data.load_dataset_hellaswag), "mmlu": ("MMLU", data.load_dataset_mmlu),
            "lambada": ("LAMBADA", data.load_dataset_lambada), "nq": ("NQ-open", data.load_dataset_nq),
            "squad2": ("SQuAD2", data.load_dataset_squad2)}


def read_json(*parts):
    return json.loads(data_dir().joinpath(*parts).read_text(encoding="utf-8"))


def read_jsonl(*parts):
    return [json.loads(line) for line in data_dir().joinpath(*parts).read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize("name", DATASETS)
def test_every_set_is_a_cached_memory_mapped_dataset_with_its_provenance(name):
    folder, load = DATASETS[name]
    ds = load()
    assert isinstance(ds, datasets.Dataset) and len(ds) > 0
    assert ds.info.description == (data_dir() / folder / "SOURCE.md").read_text(encoding="utf-8")
    assert ds.cache_files, "the rows should live in Arrow files, not in memory"
    root = (cache_dir() / "datasets").resolve()
    assert all(root in Path(f["filename"]).resolve().parents for f in ds.cache_files)
    assert load().cache_files == ds.cache_files  # the second load reads the same files


def test_list_loaders_equal_a_direct_read_of_the_files():
    assert data.load_me_ppl(50) == [r["Text"] for r in read_json("ME-PPL", "ME-PPL_50.json")]
    cf = sorted((r for s in ("edit", "train", "val") for r in read_json("CounterFact", f"counterfact-{s}.json")),
                key=lambda r: r["case_id"])
    assert data.load_counterfact() == [dict(r, dataset="counterfact") for r in cf]
    assert len(cf) == 21919
    z = read_json("zsRE", "zsre_mend_train-1k.json")[7]
    assert data.load_zsre()[7] == dict(case_id=7, prompt=z["src"], subject=z["subject"], target_new=z["alt"],
                                       ground_truth=z["answers"][0], rephrase_prompt=z["rephrase"],
                                       locality_prompt=z["loc"].removeprefix("nq question: "),
                                       locality_ground_truth=z["loc_ans"], dataset="zsre")
    labels = data_dir().joinpath("PIQA", "valid-labels.lst").read_text().split()
    assert data.load_piqa() == [dict(goal=r["goal"], choices=[r["sol1"], r["sol2"]], label=int(y))
                                for r, y in zip(read_jsonl("PIQA", "valid.jsonl"), labels)]
    assert data.load_hellaswag() == read_jsonl("HellaSwag", "hellaswag_val_1k.jsonl")
    assert data.load_lambada() == [r["text"] for r in read_jsonl("LAMBADA", "lambada_test.jsonl")]
    assert data.load_nq() == read_jsonl("NQ-open", "NQ-open.dev.jsonl")
    squad = read_json("SQuAD2", "squad_v2_dev_answerable_subset.json")
    assert data.load_squad2() == [{k: r[k] for k in ("id", "question", "answer", "context")} for r in squad]
    raw = data_dir().joinpath("WikiText-2", "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    assert data.load_wikitext() == [line for line in raw.split("\n") if line.strip()]


def test_mmlu_reads_every_subject_file_as_text():
    with data_dir().joinpath("MMLU", "test", "anatomy_test.csv").open(newline="", encoding="utf-8") as fh:
        first = next(csv.DictReader(fh))
    rows = data.load_mmlu("test")
    assert len(rows) == 14042 and len({r["subject"] for r in rows}) == 57
    anatomy = next(r for r in rows if r["subject"] == "anatomy")
    assert anatomy == dict(subject="anatomy", question=first["question"],
                           choices=[first[f"choice{i}"] for i in range(4)], label=int(first["answer"]))
    ds = data.load_dataset_mmlu("dev")  # the columns of cais/mmlu, which lm-eval's configs read
    assert ds.column_names == ["question", "subject", "choices", "answer"] and len(ds) == 285
    assert all(isinstance(c, str) for r in rows for c in r["choices"])  # "1", "None", "True" stay strings


def test_squad_answers_in_the_hub_shape():
    r = data.load_dataset_squad2()[0]
    assert r["answers"] == {"text": [r["answer"]], "answer_start": [r["answer_span"][0]]}
    assert r["context"][r["answer_span"][0]:r["answer_span"][1]] == r["answer"]


def test_samples_are_seeded_nested_and_in_file_order():
    order = list(range(100))
    random.Random(3).shuffle(order)
    assert data.sample_indices(100, 10, seed=3) == sorted(order[:10])  # the first n of a seeded shuffle
    small, big = data.sample_indices(100, 10, 3), data.sample_indices(100, 40, 3)
    assert set(small) < set(big) and big == sorted(big)
    assert data.sample_indices(5, None) == data.sample_indices(5, 9) == [0, 1, 2, 3, 4]
    assert data.sample_indices(5, 0) == []
    a, b = data.load_counterfact(n=5, seed=1), data.load_counterfact(n=12, seed=1)
    assert [c["case_id"] for c in a] == sorted(c["case_id"] for c in a)
    assert all(c in b for c in a)
    assert data.load_piqa(n=6, seed=1) == [data.load_piqa()[i] for i in data.sample_indices(1838, 6, 1)]
    assert data.sample(data.load_dataset_nq(), 3, 2)["question"] == [data.load_nq()[i]["question"]
                                                                     for i in data.sample_indices(3610, 3, 2)]
    assert data.load_counterfact(n=5, seed=1) != data.load_counterfact(n=5, seed=2)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_sample_size_is_an_error(bad):
    with pytest.raises(ValueError, match="n must be None"):
        data.load_counterfact(n=bad)
    with pytest.raises(ValueError, match="n must be None"):
        data.load_mmlu("test", n=bad)


@pytest.fixture
def own_data(tmp_path, monkeypatch):
    """A data/ folder with only ME-PPL_50, and a fresh cache."""
    monkeypatch.setenv("EDITCOLLAPSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "data" / "ME-PPL"
    folder.mkdir(parents=True)
    (folder / "SOURCE.md").write_text("# test sentences\n")
    return folder / "ME-PPL_50.json"


def test_a_missing_file_names_itself(own_data):
    with pytest.raises(data.MissingDataError, match="counterfact-edit.json"):
        data.load_counterfact()
    with pytest.raises(data.MissingDataError, match="ME-PPL_50.json"):
        data.load_me_ppl(50)


@pytest.mark.parametrize("content, problem", [("", "is empty"), ("[]", "holds no records"),
                                              ('[{"Text": "a"', "cannot read")])
def test_an_empty_or_broken_file_is_an_error_that_names_it(own_data, content, problem):
    own_data.write_text(content)
    with pytest.raises(data.DataError, match=f"ME-PPL_50.json.*{problem}|{problem}.*ME-PPL_50.json"):
        data.load_me_ppl(50)


def test_a_changed_file_is_read_again(own_data):
    own_data.write_text(json.dumps([{"Corpus": "x", "Text": "one"}]))
    assert data.load_me_ppl(50) == ["one"]
    assert data.load_dataset_me_ppl(50).info.description == "# test sentences\n"
    own_data.write_text(json.dumps([{"Corpus": "x", "Text": "two"}, {"Corpus": "x", "Text": "three"}]))
    os.utime(own_data, ns=(own_data.stat().st_atime_ns, own_data.stat().st_mtime_ns + 10**9))  # as an edit would
    assert data.load_me_ppl(50) == ["two", "three"]


def test_unknown_size_or_split_is_rejected():
    with pytest.raises(ValueError, match="sizes"):
        data.load_me_ppl(51)
    with pytest.raises(ValueError, match="split"):
        data.load_counterfact("test")
    with pytest.raises(ValueError, match="unknown edit dataset"):
        data.load_cases("wiki")


def test_a_missing_column_names_the_file(own_data):
    """It used to say "Column 'Text' doesn't exist." without naming the file."""
    own_data.write_text(json.dumps([{"Corpus": "x", "text": "one"}]))
    with pytest.raises(data.DataError,
                       match=r"ME-PPL_50.json lacks column\(s\) \['Text'\]; it has \['Corpus', 'text'\]"):
        data.load_me_ppl(50)


def test_a_zsre_case_without_an_answer_names_the_file_and_the_case(own_data):
    """It used to raise a bare IndexError."""
    folder = own_data.parent.parent / "zsRE"
    folder.mkdir()
    rows = [dict(src=f"Q{i}?", subject="Q", alt="B", answers=["A"], rephrase="Q?", loc="nq question: q", loc_ans="a")
            for i in range(3)]
    rows[1]["answers"] = []
    (folder / "zsre_mend_train-1k.json").write_text(json.dumps(rows))
    with pytest.raises(data.DataError,
                       match=r"zsre_mend_train-1k.json: case\(s\) \[1\] have no answer \(answers: \[\]\)"):
        data.load_zsre()
    assert [c["case_id"] for c in data.load_zsre(n=1, seed=0)] == [0]  # a sample without it loads
