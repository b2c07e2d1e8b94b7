"""The collapse guard on the shipped SmolLM2: it tells a known collapse case from a known normal one.

Case 946 ("Bay, which is located in" -> Italy) drives ME-PPL_50 from 167 to about 30,000 with ROME
(tests/integration/test_rome_smollm2.py); case 0 ("The mother tongue of Danielle Darrieux is" ->
English) is a normal edit. The guard reads their keys only, with no v* optimisation.
"""
import math

import pytest

from editcollapse import data, guard
from editcollapse.editors import ROME, EditError, EditRequest, live_edits
from tests.weights import identical, snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cases():
    cf = {c["case_id"]: c for c in data.load_counterfact()}
    return cf[946], cf[0]


def test_guard_separates_a_collapse_case_from_a_normal_one(smollm2, cases):
    collapse, normal = cases
    feats = guard.key_features(smollm2, [collapse, normal])
    threshold = guard.threshold_for(smollm2)
    assert feats.score[0] > threshold > feats.score[1]
    assert feats.denominator[0] == pytest.approx(0.044, abs=0.005)  # README: 0.044 from ROME's own diagnostics
    assert feats.denominator[1] > 2.0 and feats.first_token[0] and not feats.first_token[1]
    assert guard.risk(smollm2, collapse) == pytest.approx(-math.log(feats.denominator_raw[0]), rel=1e-4)


def test_guard_refuses_case_946_and_leaves_the_model_untouched(smollm2, cases):
    before = snapshot(smollm2)
    with pytest.raises(EditError, match="likely to collapse"):
        guard.Guarded(ROME(), "refuse").apply(smollm2, EditRequest.from_case(cases[0]))
    assert identical(smollm2, before)
    assert not live_edits(smollm2)
