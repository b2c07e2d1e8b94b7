"""ROME on the shipped SmolLM2: an edit takes, undo is exact, and a first-token subject collapses the model.

Case 946 of CounterFact ("Bay, which is located in" -> Italy; the subject is the prompt's first
token) drove ME-PPL_50 from 167 to about 30,000 with ROME (denominator 0.04, as the papers'
collapse cases); C-ROME, with consistent keys, keeps the model healthy.
"""
import pytest

from editcollapse import data
from editcollapse.editors import ROME, EditRequest, edited
from editcollapse.experiments.single import subject_is_first_token
from editcollapse.eval.metrics import predict_next
from editcollapse.eval.perplexity import me_ppl
from tests.weights import identical, snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_ppl(smollm2):
    return me_ppl(smollm2, 50, progress=False)["mean"]


def test_edit_changes_the_prediction_and_undo_is_exact(smollm2):
    before = snapshot(smollm2)
    request = EditRequest("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome")
    assert predict_next(smollm2, request.prompt)[0][0].strip() != "Rome"
    with edited(smollm2, request, ROME()):  # its timing is measured in bench/bench_rome.py, not here
        assert predict_next(smollm2, request.prompt)[0][0].strip() == "Rome"
    assert identical(smollm2, before)


def test_first_token_subject_collapses_rome_but_not_c_rome(smollm2, base_ppl):
    case = next(c for c in data.load_counterfact() if c["case_id"] == 946)
    assert subject_is_first_token(smollm2, case)
    with edited(smollm2, EditRequest.from_case(case), ROME()) as rome:
        rome_ppl = me_ppl(smollm2, 50, progress=False)["mean"]
    with edited(smollm2, EditRequest.from_case(case), ROME(consistent=True)) as c_rome:
        c_rome_ppl = me_ppl(smollm2, 50, progress=False)["mean"]
    assert rome_ppl > 1000 > 2 * base_ppl > c_rome_ppl
    assert rome.diagnostics["denominator"] < 0.1 * c_rome.diagnostics["denominator"]
