"""Edit metrics of the UNEDITED SmolLM2-135M on shipped CounterFact and zsRE cases."""
import pandas as pd
import pytest
import torch

from editcollapse.data import load_cases
from editcollapse.eval.metrics import edit_metrics, locality_reference, predict_next, target_nll

pytestmark = pytest.mark.integration


def test_unedited_model_prefers_the_true_object(smollm2):
    """Before any edit, CounterFact's counterfactual target rarely wins (measured on 20 cases, seed 0:
    efficacy 0.30, efficacy_acc 0.09, locality 0.65, mean p_new 0.010 vs p_true 0.030)."""
    m = pd.DataFrame([edit_metrics(smollm2, c) for c in load_cases("counterfact", n=20, seed=0)])
    assert m["efficacy"].mean() < 0.5 and m["generalization"].mean() < 0.5
    assert m["locality"].mean() > 0.5
    assert m["efficacy_acc"].mean() < m["efficacy"].mean() + 1e-9  # token argmax is the stricter test
    assert m["p_true"].mean() > m["p_new"].mean()


def test_zsre_locality_against_own_reference_is_one(smollm2):
    for c in load_cases("zsre", n=3, seed=0):
        m = edit_metrics(smollm2, c, locality_reference(smollm2, c))
        assert m["locality"] == m["locality_acc"] == 1.0
        assert 0.0 <= m["efficacy"] <= 1.0 and m["efficacy"] == m["efficacy_acc"]


def test_batched_equals_unbatched_and_next_token(smollm2):
    cases = load_cases("counterfact", n=4, seed=1)
    prompts, targets = [c["prompt"] for c in cases], [c["ground_truth"] for c in cases]
    one = torch.stack([target_nll(smollm2, [p], [t])[0] for p, t in zip(prompts, targets)])
    assert torch.allclose(target_nll(smollm2, prompts, targets), one, atol=5e-5)
    assert predict_next(smollm2, "The capital of France is", k=3)[0][0] == " Paris"
