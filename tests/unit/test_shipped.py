"""Shipped results: complete runs only, a card that counts them, and seeding that makes a rerun compute nothing."""
import json

import pytest
import torch

from editcollapse import data, paths
from editcollapse.experiments.sequential import sequential_run, sequential_store
from editcollapse.results import papers, shipped
from editcollapse.results.store import DOWNSTREAM_KEY, SEQ_KEY, ResultStore
from editcollapse.results.tables import EDITOR_LABELS, SEQUENTIAL_RUNS, sequential_summary, sequential_summary_lines
from tests.fast import FAST

KEYS = {"seq": SEQ_KEY, "ds": DOWNSTREAM_KEY}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "shipped_dir", lambda profile: tmp_path / "data" / "results" / profile)
    return tmp_path / "data"


def test_complete_runs_are_shipped_counted_and_seeded_back(tiny_models, tmp_path, data_dir):
    lm = tiny_models("tiny-llama")
    run = tmp_path / "run"
    store, ds = sequential_store(run, "seq"), sequential_store(run, "ds", key=DOWNSTREAM_KEY)
    kw = dict(state_dir=run / "state", editor_kwargs=dict(hparams=FAST), downstream_store=ds,
              downstream_steps=(0, 2), downstream_kwargs=dict(tasks=["piqa"], n=2))
    sequential_run(lm, "rome", data.load_counterfact(n=2, seed=3), store, run="done", **kw)
    # a run in progress: its rows up to step 1 of 2 (as a killed run leaves them, its weights not shipped)
    partial = [dict(r, run="busy") for r in json.loads(f"[{','.join(store.path.read_text().splitlines())}]")
               if r["step"] <= 1]
    with store.writing():
        for r in partial:
            store.append(r)

    card = shipped.ship(run, "t", KEYS, command="test")
    assert card["complete_sequential_runs"] == 1 and card["stores"]["seq"]["rows"] == 3
    assert {c["run"] for c in card["stores"]["seq"]["counts"]} == {"done"}
    assert card["stores"]["ds"]["rows"] == len(ds.read()) and card["machine"]["cpu"]
    assert (data_dir / "results" / "t" / "CARD.md").read_text().startswith("# Shipped results: profile `t`")
    assert len(shipped.load("t", "seq")) == card["stores"]["seq"]["rows"]

    fresh = tmp_path / "fresh"
    assert shipped.seed("t", fresh) == {"seq": 3, "ds": card["stores"]["ds"]["rows"]}
    assert shipped.seed("t", fresh) == {"seq": 0, "ds": 0}  # seeding twice adds nothing
    got = sequential_store(fresh, "seq").read().sort_values("step").reset_index(drop=True)
    want = store.read()
    want = want[want.run == "done"].sort_values("step").reset_index(drop=True)
    assert got.drop(columns="tensors").equals(want.drop(columns="tensors")) and got.tensors.tolist() == want.tensors.tolist()
    # the seeded run is complete: a rerun edits nothing and needs no state file
    assert sequential_run(lm, "rome", data.load_counterfact(n=2, seed=3), sequential_store(fresh, "seq"), run="done",
                          **dict(kw, state_dir=fresh / "state", downstream_store=sequential_store(fresh, "ds",
                                                                                                key=DOWNSTREAM_KEY))) == 0


def test_rows_holding_tensors_are_not_shipped(tmp_path, data_dir):
    store = ResultStore(tmp_path / "run" / "x.jsonl", ("case_id",))
    store.append(dict(case_id=1, items=[0.5, 0.25], curve=torch.ones(2, 2)))  # a tensor is stored as nested lists
    with pytest.raises(ValueError, match="x: rows hold tensors.*curve"):
        shipped.ship(tmp_path / "run", "t", {"x": ("case_id",)})


def test_seeding_a_profile_with_nothing_shipped_adds_nothing(tmp_path, data_dir):
    assert shipped.seed("nothing-here", tmp_path) == {}


PROFILES = sorted(p.name for p in (paths.data_dir() / "results").glob("*") if (p / "card.json").exists())


@pytest.mark.parametrize("profile", PROFILES)
def test_the_shipped_tables_load_and_match_their_card(profile):
    card = shipped.card(profile)
    for name, entry in card["stores"].items():
        rows = shipped.load(profile, name)
        assert len(rows) == entry["rows"] == sum(c["rows"] for c in entry["counts"])
        assert not rows.duplicated(subset=entry["key"]).any(), f"{name}: a key is shipped twice"


@pytest.mark.skipif("local" not in PROFILES, reason="no local profile shipped")
def test_the_readme_long_profile_findings_are_the_shipped_rows():
    """The README's tables of the sequential runs, and their rows in the papers-against-ours table, are what the
    library computes from the shipped rows, for every run shipped."""
    readme = (paths.REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### The long profile"):readme.index("### Figures")]
    sequential, downstream = shipped.load("local", "sequential"), shipped.load("local", "sequential_downstream")
    summary = sequential_summary(sequential, downstream)
    lines = sequential_summary_lines(summary, EDITOR_LABELS, SEQUENTIAL_RUNS)
    assert len(lines) == 2 * (2 + len(summary)) + 1  # every shipped run has its row in both tables
    for line in lines:
        assert line in section, line
    versus = papers.versus("llama2-7b", sequential=sequential)
    for line in papers.sequential_lines(versus, summary, EDITOR_LABELS):
        assert line in section, line
    unedited = versus.set_index(papers.KEY).ours[("sequential_ppl_end", "unedited", "")]
    assert f"| {unedited:,.0f} |" in section


def test_the_readme_safe_edit_findings_are_the_shipped_rows():
    """The README's table of the editors on notebook 06's test half states what its library computes from the
    shipped single-edit rows (the unedited ME-PPL from the rows' own ppl / ppl_ratio), for every editor shipped."""
    from editcollapse.analysis import safe_edit

    readme = (paths.REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Safe hard edits"):readme.index("### Figures")]
    test = safe_edit.half(safe_edit.study_samples("smollm2-135m", 50))
    editors = {"rome-2k": "two-key ROME", "memit-2k": "MEMIT with k^u", "c-rome": "C-ROME",
               "c-rome-prefix": "C-ROME with a test-time prefix, bare prompt", "rome": "ROME"}
    rows = safe_edit.study_rows(shipped.load("local", "single_edit"), "smollm2-135m", list(editors), test)
    original = float((rows.ppl / rows.ppl_ratio).median())
    table = safe_edit.single_table(rows, original)
    assert "rome-2k" in set(rows.editor)
    for editor in set(rows.editor):
        lines = safe_edit.readme_rows(table, editor, {s: f"{editors[editor]}, {label}" for s, label in
                                                      (("hardcf", "HardCF"), ("hardedit", "HardEdit"), ("normal", "normal"))})
        assert lines and all(line in section for line in lines), editor
    if "c-rome-prefix" in set(rows.editor):
        behind = rows[rows.editor == "c-rome-prefix"].groupby("sample")[["prefixed_efficacy_acc",
                                                                          "prefixed_efficacy_prob"]].mean()
        acc, prob = behind.prefixed_efficacy_acc, behind.prefixed_efficacy_prob
        assert (f"({acc['hardcf']:.2f} on HardCF, {acc['hardedit']:.2f} on HardEdit; {prob['hardcf']:.2f} and "
                f"{prob['hardedit']:.2f} by ROME's probability") in " ".join(section.split())


def test_the_readme_safe_edit_sequences_are_the_shipped_rows():
    """The README's table of notebook 06's sequences (every test-half hard case in one sequence) states what
    `safe_edit.sequential_table` computes from the shipped step and retention rows, for every shipped editor."""
    from editcollapse.analysis import safe_edit

    readme = (paths.REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### Safe hard edits"):readme.index("### Figures")]
    steps = shipped.load("local", "safe_edit_sequential")
    original = float(steps[steps.step == 0].ppl.median())
    table = safe_edit.sequential_table(steps, shipped.load("local", "safe_edit_retention"), original)
    labels = {"rome-2k": "two-key ROME", "memit-2k": "MEMIT with k^u", "c-rome": "C-ROME"}
    assert set(steps.editor) <= set(labels)
    lines = safe_edit.readme_sequential_rows(table, labels)
    assert len(lines) == len(set(steps.editor)) and all(line in section for line in lines)
