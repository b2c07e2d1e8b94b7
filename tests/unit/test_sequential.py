"""Sequential editing on tiny models: one row per step, exact restore, resume after an interruption (kills: tests/crash)."""
import subprocess
import sys

import pytest
import torch

from editcollapse import data
from editcollapse.editors import get_editor, live_edits
from editcollapse.experiments.sequential import (param_change, sequential_run, sequential_runs,
                                                 sequential_store)
from editcollapse.results.store import DOWNSTREAM_KEY, RETENTION_KEY
from tests.fast import FAST
from tests.weights import snapshot, identical


def cases(n=4):
    return data.load_counterfact(n=n, seed=3)


def test_param_change_by_hand():
    w0 = torch.diag(torch.tensor([4.0, 2.0, 1.0]))
    wt = torch.diag(torch.tensor([4.0, 2.0, 0.5]))
    c = param_change(w0, wt)
    assert c["delta_norm"] == pytest.approx(0.5)
    assert c["rel_change"] == pytest.approx(0.5 / 21 ** 0.5)
    assert c["norm_growth"] == pytest.approx(20.25 ** 0.5 / 21 ** 0.5)
    assert (c["cond_0"], c["cond"]) == pytest.approx((4.0, 8.0))


def test_a_run_has_one_row_per_step_and_restores_the_model(tiny_models, tmp_path):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    store = sequential_store(tmp_path, "seq")
    n = sequential_run(lm, "rome", cases(), store, run="normal", ppl_size=50, state_dir=tmp_path / "state",
                       editor_kwargs=dict(hparams=FAST))
    rows = store.read().sort_values("step")
    assert n == 5 and rows.step.tolist() == [0, 1, 2, 3, 4]
    assert identical(lm, before) and not live_edits(lm)
    assert rows.cum_rel_change.iloc[0] == 0 and (rows.cum_rel_change.iloc[1:] > 0).all()
    assert rows.tensors.iloc[-1].keys() == {lm.spec.module("mlp_out", 1) + ".weight"}
    assert rows.edit_denominator.iloc[1:].notna().all() and rows.error.isna().all()
    # a finished run writes nothing more
    assert sequential_run(lm, "rome", cases(), store, run="normal", ppl_size=50, state_dir=tmp_path / "state",
                          editor_kwargs=dict(hparams=FAST)) == 0
    # the run released the store's writer lock: another process can write to the store now
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in rows.iloc[0][list(store.key)].items()}
    code = (f"from editcollapse.experiments.sequential import sequential_store; "
            f"sequential_store({str(tmp_path)!r}, 'seq').append(dict({row!r}, step=99))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert 99 in set(store.read().step)


def test_an_interrupted_run_resumes_without_repeating_or_losing_a_step(tiny_models, tmp_path, monkeypatch):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    ref = sequential_store(tmp_path, "ref")
    sequential_run(lm, "c-rome", cases(), ref, run="r", state_dir=tmp_path / "ref_state", editor_kwargs=dict(hparams=FAST))

    store = sequential_store(tmp_path, "seq")
    real_append, calls = type(store).append, {"n": 0}

    def flaky(self, row):
        calls["n"] += 1
        if calls["n"] == 3:  # the row of step 2, after its weights were saved
            raise KeyboardInterrupt
        real_append(self, row)

    monkeypatch.setattr(type(store), "append", flaky)
    with pytest.raises(KeyboardInterrupt):
        sequential_run(lm, "c-rome", cases(), store, run="r", state_dir=tmp_path / "state",
                       editor_kwargs=dict(hparams=FAST))
    monkeypatch.undo()
    assert identical(lm, before) and not live_edits(lm)
    assert sorted(sequential_store(tmp_path, "seq").read().step) == [0, 1]
    sequential_run(lm, "c-rome", cases(), sequential_store(tmp_path, "seq"), run="r", state_dir=tmp_path / "state",
                   editor_kwargs=dict(hparams=FAST))
    got, want = sequential_store(tmp_path, "seq").read().sort_values("step"), ref.read().sort_values("step")
    timings = [c for c in want if c.startswith("seconds")]
    assert got.step.tolist() == [0, 1, 2, 3, 4]
    # step 2's row was pending when the run stopped: completed from the saved state, metrics included
    assert got.efficacy[got.step > 0].notna().all() and got.drop(columns=timings).equals(want.drop(columns=timings))
    assert identical(lm, before)


def test_retention_scores_every_edit_again_under_the_final_weights(tiny_models, tmp_path):
    """At the last step every case is scored again: the last case's scores are its step row's (same weights); the
    first case's are those of the final model, which a stack of the same edits reproduces; a rerun adds nothing."""
    from editcollapse.editors import EditRequest, EditStack
    from editcollapse.eval import metrics

    lm = tiny_models("tiny-llama")
    seq = cases(3)
    store, kept = sequential_store(tmp_path, "seq"), sequential_store(tmp_path, "kept", key=RETENTION_KEY)
    kwargs = dict(run="x", state_dir=tmp_path / "state", editor_kwargs=dict(hparams=FAST), retention_store=kept)
    sequential_run(lm, "rome", seq, store, **kwargs)
    rows, again = store.read().set_index("step"), kept.read().set_index("edited_at").sort_index()
    assert again.index.tolist() == [1, 2, 3] and set(again.step) == {3} and again.case_id.tolist() == [c["case_id"] for c in seq]
    for name in ("efficacy", "generalization", "p_new"):
        assert again.loc[3, name] == pytest.approx(rows.loc[3, name])
    with EditStack(lm) as stack:
        editor = get_editor("rome", hparams=FAST)
        for c in seq:
            stack.apply(editor, EditRequest.from_case(c))
        assert again.loc[1, "p_new"] == pytest.approx(metrics.edit_metrics(lm, seq[0])["p_new"], rel=1e-4)
    sequential_run(lm, "rome", seq, store, **kwargs)
    assert len(kept.read()) == 3


def test_state_of_another_sequence_is_refused(tiny_models, tmp_path):
    lm = tiny_models("tiny-llama")
    store = sequential_store(tmp_path, "seq")
    sequential_run(lm, "rome", cases(2), store, run="x", state_dir=tmp_path / "state", editor_kwargs=dict(hparams=FAST))
    with pytest.raises(ValueError, match="belongs to another run"):
        sequential_run(lm, "rome", cases(3), sequential_store(tmp_path, "other"), run="x", state_dir=tmp_path / "state",
                       editor_kwargs=dict(hparams=FAST))


def test_refused_edits_are_rows_and_downstream_is_taken_at_checkpoints(tiny_models, tmp_path):
    lm = tiny_models("tiny-llama")
    seq = cases(2)
    seq.insert(1, dict(seq[0], case_id=-7, subject="Nowhere in the prompt"))
    store, ds = sequential_store(tmp_path, "seq"), sequential_store(tmp_path, "ds", key=DOWNSTREAM_KEY)
    sequential_run(lm, "rome", seq, store, run="x", state_dir=tmp_path / "state", editor_kwargs=dict(hparams=FAST),
                   downstream_steps=(0, 3), downstream_store=ds, downstream_kwargs=dict(tasks=["piqa"], n=3))
    rows = store.read().sort_values("step")
    assert rows.error.notna().tolist() == [False, False, True, False]
    assert sorted(set(ds.read().step)) == [0, 3] and set(ds.read().task) == {"piqa"}


def test_hard_cases_are_the_rome_collapse_cases_and_normal_ones_match_their_number(tiny_models, tmp_path):
    from editcollapse.experiments.single import hard_and_normal_cases, results_store, subject_is_first_token

    lm = tiny_models("tiny-gpt2")
    store = results_store(tmp_path, "single_edit")
    key = dict(experiment="single_edit_ppl50", model="tiny-gpt2", dataset="counterfact", error=None)
    for case_id, editor, collapsed in [(10, "rome", True), (4, "rome", True), (7, "rome", False), (11, "c-rome", True),
                                       (12, "rome", True)]:
        store.append(dict(key, editor=editor, case_id=case_id, collapsed=collapsed))
    store.append(dict(key, experiment="single_edit_ppl1000", editor="rome", case_id=13, collapsed=True))
    hard, normal = hard_and_normal_cases(lm, store, n=2)
    assert [c["case_id"] for c in hard] == [4, 10]
    assert len(normal) == 2 and not {c["case_id"] for c in normal} & {4, 10, 12}
    assert not any(subject_is_first_token(lm, c) for c in normal)


def test_a_shipped_hardcf_gives_the_hard_cases(tiny_models, tmp_path, monkeypatch):
    """data/hardcf/<model>.json, where it exists, is the source of the hard cases (the store is not read)."""
    import json
    import shutil

    from editcollapse import paths
    from editcollapse.experiments.single import hard_and_normal_cases, results_store

    lm = tiny_models("tiny-gpt2")
    fake = tmp_path / "data"
    shutil.copytree(paths.data_dir() / "CounterFact", fake / "CounterFact")
    (fake / "hardcf").mkdir()
    picked = [c for c in data.load_counterfact() if c["case_id"] in (30, 5, 17)]
    (fake / "hardcf" / "tiny-gpt2.json").write_text(json.dumps([dict(c, ppl=5000.0) for c in picked]))
    monkeypatch.setenv("EDITCOLLAPSE_DATA", str(fake))
    hard, normal = hard_and_normal_cases(lm, results_store(tmp_path, "empty"), n=2)
    assert [c["case_id"] for c in hard] == [5, 17] and len(normal) == 2


def test_a_truncated_state_file_is_refused_with_its_name(tiny_models, tmp_path):
    lm = tiny_models("tiny-llama")
    sequential_run(lm, "rome", cases(1), sequential_store(tmp_path, "seq"), run="t", state_dir=tmp_path / "state",
                   editor_kwargs=dict(hparams=FAST))
    path = tmp_path / "state" / "tiny-llama" / "rome" / "sequential_t.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="sequential_t.safetensors cannot be read"):  # a longer run: not complete
        sequential_run(lm, "rome", cases(2), sequential_store(tmp_path, "seq"), run="t", state_dir=tmp_path / "state",
                       editor_kwargs=dict(hparams=FAST))
    assert not live_edits(lm)


@pytest.mark.parametrize("names", [dict(run="../x"), dict(run="a/b"), dict(run=""), dict(run=".hidden"),
                                   dict(run="x", experiment="../../etc"), dict(run=3)])
def test_a_run_name_that_is_not_a_plain_name_is_refused(tiny_models, tmp_path, names):
    with pytest.raises(ValueError, match="must be a plain name"):
        sequential_run(tiny_models("tiny-llama"), "rome", cases(1), sequential_store(tmp_path, "seq"),
                       state_dir=tmp_path / "state", **names)
    assert not (tmp_path / "seq.jsonl").exists() and not (tmp_path / "state").exists()


def test_checkpoints_hold_the_larger_perplexity_and_a_complete_run_needs_no_state(tiny_models, tmp_path):
    """The checkpoint perplexity at the chosen steps only (size 50 here: the tiny models' 256 positions are
    too few for ME-PPL_1k); a run whose rows are all stored (shipped rows, no weights) is complete: it
    returns at once, without its state file, and writes nothing."""
    lm = tiny_models("tiny-llama")
    store = sequential_store(tmp_path, "seq")
    kw = dict(run="c", state_dir=tmp_path / "state", editor_kwargs=dict(hparams=FAST))
    sequential_run(lm, "rome", cases(2), store, checkpoint_steps=(0, 2), checkpoint_ppl_size=50, **kw)
    rows = store.read().sort_values("step")
    assert rows.ppl_50.notna().tolist() == [True, False, True]
    assert rows.ppl_50[rows.step != 1].tolist() == rows.ppl[rows.step != 1].tolist()
    for f in (tmp_path / "state").rglob("*.safetensors"):
        f.unlink()
    assert sequential_run(lm, "rome", cases(2), sequential_store(tmp_path, "seq"), **kw) == 0
    assert len(sequential_store(tmp_path, "seq").read()) == 3


def test_every_editor_runs_every_sequence_with_downstream_and_checkpoints_where_asked(tiny_models, tmp_path, monkeypatch):
    """sequential_runs passes each run its settings (downstream at the last step, and the first with
    downstream_at_start; evenly spaced checkpoints), skips empty runs and returns these runs' steps."""
    from editcollapse.experiments import sequential

    lm = tiny_models("tiny-llama")
    calls, real = [], sequential.sequential_run
    monkeypatch.setattr(sequential, "sequential_run", lambda lm, editor, seq, store, **kw: calls.append(
        (editor, kw["run"], len(seq), kw["downstream_steps"], list(kw["checkpoint_steps"]), kw["checkpoint_ppl_size"])))
    sequential_runs(lm, ["rome", "memit"], {"hard": cases(4), "none": [], "normal": cases(2)}, sequential_store(tmp_path),
                    downstream_at_start=True, checkpoint_ppl_size=1000, n_checkpoints=3)
    assert calls == [("rome", "hard", 4, (0, 4), [0, 2, 4], 1000), ("rome", "normal", 2, (0, 2), [0, 1, 2], 1000),
                     ("memit", "hard", 4, (0, 4), [0, 2, 4], 1000), ("memit", "normal", 2, (0, 2), [0, 1, 2], 1000)]
    calls.clear()
    sequential_runs(lm, ["rome"], {"r": cases(2)}, sequential_store(tmp_path), experiment="x")
    assert calls == [("rome", "r", 2, (2,), [], 1000)]
    monkeypatch.setattr(sequential, "sequential_run", real)
    store = sequential_store(tmp_path, "seq")
    rome = get_editor("rome", hparams=FAST)
    steps = sequential_runs(lm, [rome], {"a": cases(2), "b": cases(1)}, store, state_dir=tmp_path / "state")
    assert list(zip(steps.run, steps.step)) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
    assert (steps.ppl_size == 50).all() and len(store.read()) == 5

