"""MEMIT and AlphaEdit on the shipped SmolLM2 with the calibrated settings (docs/memit_calibration.md).

CounterFact case 7515, "Adobe Flash is created by" -> Apple (true: Adobe, which the unedited model
prefers, P 0.13 against 0.03): one edit of each editor makes Apple the likelier answer, and undo
restores the weights exactly. C of layers 4-8 (100k tokens each) is computed on the first run
(minutes) and cached.
"""
import pytest

from editcollapse import data

from editcollapse.eval import metrics
from editcollapse.editors import AlphaEdit, EditRequest, MEMIT, edited
from editcollapse.experiments.single import subject_is_first_token
from tests.weights import identical, snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def case(smollm2):
    case = next(c for c in data.load_counterfact() if c["case_id"] == 7515)
    assert not subject_is_first_token(smollm2, case)
    assert metrics.edit_metrics(smollm2, case)["efficacy"] == 0
    return case


@pytest.mark.parametrize("editor", [MEMIT, AlphaEdit])
def test_one_edit_flips_a_normal_case_and_undo_is_exact(smollm2, case, editor):
    before = snapshot(smollm2)
    with edited(smollm2, EditRequest.from_case(case), editor()) as result:
        m = metrics.edit_metrics(smollm2, case)
        assert m["efficacy"] == 1 and m["p_new"] > 0.5
        d = result.diagnostics
        assert d["layers"] == [4, 5, 6, 7, 8] and d["realised_fraction"] > 0.5 and d["n_tensors"] == 5
    assert identical(smollm2, before)
