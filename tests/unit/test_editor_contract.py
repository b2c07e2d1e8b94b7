"""The editor contract, for every registered editor on the four tiny architectures.

Undo is bit-identical and ordered; bad requests are refused with the model untouched; an edit
interrupted after it wrote is rolled back; the common diagnostics schema holds; a sweep turns
refusals and failures into rows with `error` set.
"""
import functools
import signal
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from editcollapse import data

from editcollapse.experiments import single
from editcollapse.editors import EDITORS, EditError, EditRequest, EditStack, edited, get_editor, live_edits
from editcollapse.editors import base, mend
from editcollapse.models.loading import load_model
from tests.device import DEVICE
from tests.fast import FAST_BY_EDITOR  # few optimisation steps: the contract is about bookkeeping
from tests.weights import snapshot, identical

ARCHS = ["tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-gemma3"]
REQ = EditRequest("Twitter was acquired by", "Twitter", "Microsoft", "Elon Musk", case_id=1)
REQ2 = EditRequest("The capital of France is", "France", "Rome", "Paris", case_id=2)
BAD = [
    EditRequest("Paris is the capital of", "London", "Italy"),
    EditRequest("Paris is the capital of", "Paris", "  "),
    EditRequest("Paris is the capital of", "Paris", "France", "France"),
    EditRequest("I saw Berlin in", "erlin", "Rome"),
    EditRequest("Paris {0} the capital of", "Paris", "Italy"),
    EditRequest("Paris is the capital of", None, "Italy"),
    EditRequest("Paris is the capital of", "Paris", 5),
    EditRequest("Ber{}lin was formed in", "Ber{}lin", "Rome"),
    EditRequest("Paris is the capital of", "Paris", "france", "France "),
]


@functools.cache
def mend_checkpoints():
    """MEND needs a trained checkpoint: one per tiny architecture, trained for 4 steps (seconds)."""
    cases = data.load_counterfact("train", n=20)
    return {arch: mend.train(lm, mend.MEND().hparams_for(lm), steps=4, cases=cases, progress=False)
            for arch, lm in ((arch, load_model(arch, device=DEVICE)) for arch in ARCHS)}


def editor(name, **hparams):
    extra = {"checkpoint": mend_checkpoints()} if name == "mend" else {}
    return get_editor(name, hparams={**FAST_BY_EDITOR.get(name, {}), **hparams}, **extra)


@pytest.fixture(params=ARCHS)
def lm(request, tiny_models):
    lm = tiny_models(request.param)
    assert not live_edits(lm)
    yield lm
    assert not live_edits(lm), "a test left an edit applied"


@pytest.mark.parametrize("name", EDITORS)
def test_apply_then_undo_is_bit_identical_with_the_common_diagnostics(lm, name):
    before = snapshot(lm)
    with edited(lm, REQ, editor(name)) as result:
        assert not identical(lm, before)
        assert result.requests == (REQ,) and result.request == REQ and result.editor == name
        d = result.diagnostics
        assert d["n_tensors"] == len(d["tensors"]) == len(result.saved) >= 1
        total = 0.0
        for tensor_name, t in d["tensors"].items():
            delta = lm.model.get_parameter(tensor_name).detach() - result.saved[tensor_name]
            assert t["delta_norm"] == pytest.approx(delta.norm().item(), rel=1e-4)
            assert t["rel_change"] == pytest.approx(t["delta_norm"] / result.saved[tensor_name].norm().item(), rel=1e-4)
            assert t["top"][0]["value"] == pytest.approx(delta[tuple(t["top"][0]["index"])].item())
            assert abs(t["top"][0]["value"]) == pytest.approx(delta.abs().max().item())
            total += t["delta_norm"] ** 2
        assert d["delta_norm"] == pytest.approx(total ** 0.5, rel=1e-5) and d["delta_norm"] > 0
        assert all(isinstance(v, (bool, int, float, str)) for v in result.scalars().values())
        assert result.seconds["total"] > 0
    assert identical(lm, before) and result.undone


@pytest.mark.parametrize("name", EDITORS)
def test_settings_are_declared_checked_in_one_place_and_every_preset_holds(name):
    """Every field of an editor's settings has a Spec; each refuses a wrong value, naming the class and the field."""
    ed = get_editor(name)
    cls = ed.hyperparams
    assert issubclass(cls, base.HyperParams) and ed.presets
    for preset in ed.presets.values():
        cls(**preset)
    for f in fields(cls):
        assert isinstance(f.metadata.get("spec"), base.Spec), f"{cls.__name__}.{f.name} has no spec"
        with pytest.raises(EditError, match=rf"^{cls.__name__}\.{f.name} must be"):
            get_editor(name, hparams={f.name: "x"})


@pytest.mark.parametrize("name", EDITORS)
def test_phase_callbacks_see_every_timed_phase_start_and_end(tiny_models, name):
    lm, calls = tiny_models("tiny-llama"), []
    ed = editor(name)
    ed.on_phase(lambda phase, started: calls.append((phase, started)))
    with edited(lm, REQ, ed) as result:
        pass
    assert calls and calls[0::2] == [(phase, True) for phase, _ in calls[0::2]]
    assert calls[1::2] == [(phase, False) for phase, _ in calls[0::2]]
    assert {phase for phase, _ in calls} == set(result.seconds) - {"total"}


@pytest.mark.parametrize("name", EDITORS)
def test_bad_requests_are_refused_with_the_model_untouched(lm, name):
    before = snapshot(lm)
    ed = editor(name)
    for bad in BAD:
        with pytest.raises(EditError):
            ed.apply(lm, bad)
    for not_a_request in ([], "Paris", [REQ, "x"], None):
        with pytest.raises(EditError):
            ed.apply(lm, not_a_request)
    assert identical(lm, before)


@pytest.mark.parametrize("name", EDITORS)
def test_batches_are_applied_whole_or_refused(lm, name):
    before = snapshot(lm)
    ed = editor(name)
    if not ed.batched:
        with pytest.raises(EditError, match="one fact at a time"):
            ed.apply(lm, [REQ, REQ2])
    else:
        with edited(lm, [REQ, REQ2], ed) as result:
            assert result.requests == (REQ, REQ2)
            with pytest.raises(AttributeError):
                result.request
    with pytest.raises(EditError):  # one bad request refuses the whole batch
        ed.apply(lm, [REQ, BAD[0]])
    assert identical(lm, before)


@pytest.mark.parametrize("name", EDITORS)
def test_undo_out_of_order_is_refused_and_last_first_restores(lm, name):
    before = snapshot(lm)
    a = editor(name).apply(lm, REQ)
    b = editor(name).apply(lm, REQ2)
    with pytest.raises(EditError, match="out of order: 1 later edit"):
        a.undo()
    assert not a.undone and live_edits(lm) == [a, b]
    b.undo()
    a.undo()
    a.undo()  # a second undo does nothing
    assert identical(lm, before) and not live_edits(lm)


@pytest.mark.parametrize("name", EDITORS)
def test_an_edit_interrupted_after_writing_is_rolled_back(lm, name, monkeypatch):
    before = snapshot(lm)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "tensor_changes", interrupted)  # runs after the editor has written
    with pytest.raises(KeyboardInterrupt):
        editor(name).apply(lm, REQ)
    assert identical(lm, before) and not live_edits(lm)


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """A Ctrl-C raises KeyboardInterrupt here, whatever handler an earlier test left for SIGINT (in the whole suite
    one does: these tests failed there twice and passed alone)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_at_the_next_restore(monkeypatch):
    """A Ctrl-C (a real SIGINT) as the next restore fetches its first tensor."""
    fetch = base.get_parameter

    def interrupted(model, name):
        monkeypatch.setattr(base, "get_parameter", fetch)
        signal.raise_signal(signal.SIGINT)
        return fetch(model, name)

    monkeypatch.setattr(base, "get_parameter", interrupted)


@pytest.mark.parametrize("name", EDITORS)
def test_a_second_ctrl_c_during_the_rollback_of_an_apply_waits_until_the_model_is_restored(tiny_models, name,
                                                                                          monkeypatch):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)

    def interrupted(*args, **kwargs):
        ctrl_c_at_the_next_restore(monkeypatch)
        raise KeyboardInterrupt

    monkeypatch.setattr(base, "tensor_changes", interrupted)  # runs after the editor has written
    with pytest.raises(KeyboardInterrupt):
        editor(name).apply(lm, REQ)
    assert identical(lm, before) and not live_edits(lm)


def test_a_ctrl_c_during_an_undo_waits_until_it_is_complete(tiny_models, monkeypatch):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    result = editor("memit").apply(lm, REQ)
    ctrl_c_at_the_next_restore(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        result.undo()
    assert identical(lm, before) and result.undone and not live_edits(lm)


def test_a_second_ctrl_c_during_the_rollback_of_an_edit_stack_waits_until_all_is_undone(tiny_models, monkeypatch):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    with pytest.raises(KeyboardInterrupt):
        with EditStack(lm) as stack:
            stack.apply(editor("rome"), REQ)
            stack.apply(editor("rome"), REQ2)
            ctrl_c_at_the_next_restore(monkeypatch)
            raise KeyboardInterrupt  # the first Ctrl-C
    assert identical(lm, before) and not live_edits(lm) and not len(stack)


def test_an_error_in_an_edit_stack_propagates_with_its_failed_rollback_noted(tiny_models):
    """The stack's exit used to replace the block's error with the EditError of the rollback."""
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    with pytest.raises(RuntimeError, match="boom") as raised:
        with EditStack(lm) as stack:
            stack.apply(editor("rome"), REQ)
            outside = editor("rome").apply(lm, REQ2)  # not in the stack: its undo must come first
            raise RuntimeError("boom")
    assert raised.value.__notes__ == [
        "EditStack could not roll back (EditError: undo out of order: 1 later edit(s) of this model are still "
        "applied; undo them first (last applied, first undone), e.g. with an EditStack); 1 edit(s) of the stack "
        "are still applied"]
    outside.undo()
    stack.undo_all()
    assert identical(lm, before) and not live_edits(lm)


def test_edit_stack_applies_in_sequence_and_undoes_last_first(tiny_models):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    with EditStack(lm) as stack:
        first = stack.apply(editor("rome"), REQ)
        after_first = snapshot(lm)
        stack.apply(editor("c-rome"), REQ2)
        stack.apply(editor("rome"), EditRequest("Tokyo is in", "Tokyo", "Spain", case_id=3))
        assert len(stack) == 3 and live_edits(lm) == stack.results
        with pytest.raises(EditError, match="out of order"):
            first.undo()
        stack.undo_last()
        stack.undo_last()
        assert identical(lm, after_first)
    assert identical(lm, before) and not live_edits(lm)


def test_one_editor_serves_several_models(tiny_models):
    ed = editor("rome", mom2_adjustment=True, mom2_n_tokens=500)
    for name in ("tiny-llama", "tiny-gpt2"):
        lm = tiny_models(name)
        before = snapshot(lm)
        with edited(lm, REQ, ed) as result:
            assert result.diagnostics["C_inv_k"].shape == result.diagnostics["k_u"].shape
        assert identical(lm, before)


@pytest.mark.parametrize("name", EDITORS)
def test_refused_and_failed_edits_become_rows_with_error(tiny_models, name, monkeypatch):
    lm = tiny_models("tiny-llama")
    before = snapshot(lm)
    ed = editor(name)
    good = dict(case_id=5, dataset="counterfact", prompt="Paris is the capital of", subject="Paris",
                target_new="Italy", ground_truth="France", rephrase_prompt="Paris is the capital city of",
                locality_prompt="Berlin is the capital of", locality_ground_truth="Germany")
    bad_cases = [dict(good, subject=None), {k: v for k, v in good.items() if k != "case_id"} | dict(subject="Rome"),
                 dict(good, subject="aris"), {"prompt": 3}, None]
    for case in bad_cases:
        row = single.single_edit_row(lm, ed, case, ppl_size=50)
        assert row["error"] and "ppl" not in row
    monkeypatch.setattr(base, "tensor_changes", lambda *a, **k: (_ for _ in ()).throw(EditError("non-finite x")))
    row = single.single_edit_row(lm, ed, good, ppl_size=50)
    assert "non-finite" in row["error"]
    assert identical(lm, before) and not live_edits(lm)


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
ODD = st.one_of(TEXT, st.sampled_from(["{}", "{", "}", "{x}", " ", "Paris", "Paris {}", "é", "東京"]),
                st.none(), st.integers(), st.floats(allow_nan=True))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=ODD, subject=ODD, target=ODD, true=st.one_of(st.none(), ODD))
def test_fuzzed_requests_raise_only_edit_errors_and_never_change_a_refused_model(tiny_models, prompt, subject,
                                                                                 target, true):
    lm = tiny_models("tiny-gpt2")
    before = snapshot(lm)
    try:
        result = editor("rome", v_num_grad_steps=1).apply(
            lm, EditRequest(prompt, subject, target, true))
    except EditError:
        assert identical(lm, before) and not live_edits(lm)
        return
    result.undo()
    assert identical(lm, before)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=TEXT, subject=TEXT, after=TEXT, target=TEXT, name=st.sampled_from(sorted(EDITORS)))
def test_fuzzed_subjects_inside_their_prompt_edit_or_are_refused_cleanly(tiny_models, before, subject, after,
                                                                         target, name):
    """Random text around a random subject (unicode, braces, spaces): an edit that undoes exactly, or an EditError."""
    lm = tiny_models("tiny-llama")
    snap = snapshot(lm)
    try:
        one_step = {"v_num_grad_steps": 1} if "v_num_grad_steps" in FAST_BY_EDITOR[name] else {}
        result = editor(name, **one_step).apply(lm, EditRequest(before + subject + after, subject, target))
    except EditError as e:
        event(f"refused: {str(e).split(' ')[0:2]}")
        assert identical(lm, snap) and not live_edits(lm)
        return
    event("edited")
    assert result.diagnostics["delta_norm"] >= 0
    result.undo()
    assert identical(lm, snap)
