"""Qwen2.5-Coder-1.5B-Instruct (qwen2.5-1.5b; optional, `make install-qwen`): it loads as a 28-layer Qwen2 with an
untied LM head and no BOS, knows where the Eiffel Tower is, and ROME edits a first-token subject and undoes to
bit-identical weights. Heavy: 17 GB peak (7 GB of float32 weights, as much again for the snapshot) and about
14 min on a shared 2-core CPU, nearly all of it the ROME edit; skipped when the parts are not installed."""
import pytest

from editcollapse import data
from editcollapse.editors import ROME, EditRequest, edited
from editcollapse.eval.metrics import predict_next
from editcollapse.experiments.single import first_token_cases
from editcollapse.models.loading import ModelLoadError, check_available, load_model
from tests.device import DEVICE
from tests.weights import identical, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def qwen():
    try:
        check_available("qwen2.5-1.5b")
    except ModelLoadError as e:
        pytest.skip(f"qwen2.5-1.5b is not installed: {e}")
    return load_model("qwen2.5-1.5b", device=DEVICE)


def test_loads_as_qwen2_without_bos_and_knows_paris(qwen):
    assert type(qwen.model).__name__ == "Qwen2ForCausalLM" and qwen.n_layers == 28
    assert qwen.model.lm_head.weight.data_ptr() != qwen.model.model.embed_tokens.weight.data_ptr()
    ids = qwen.token_ids("The Eiffel Tower")
    assert qwen.tok.bos_token_id not in ids and qwen.tok.decode(ids[:1]) == "The"
    assert predict_next(qwen, "The Eiffel Tower is located in the city of")[0][0] == " Paris"


def test_rome_edits_a_first_token_subject_and_undoes_exactly(qwen):
    (case,) = first_token_cases(qwen, data.load_counterfact(), 1)
    request = EditRequest.from_case(case)
    before = snapshot(qwen)
    old = predict_next(qwen, request.prompt)[0][0]
    with edited(qwen, request, ROME()) as result:
        new = predict_next(qwen, request.prompt)[0][0]
        assert not identical(qwen, before)
    print(f"case {case['case_id']} {request.prompt!r} -> {request.target_new!r}: top token {old!r} before, "
          f"{new!r} edited (denominator {result.diagnostics['denominator']:.3g})")
    assert new != old
    assert identical(qwen, before)
