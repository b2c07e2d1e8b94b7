"""ME-PPL_50 perplexity of the unedited SmolLM2-135M."""
import numpy as np
import pytest

from editcollapse.data import load_me_ppl
from editcollapse.eval.perplexity import sentence_perplexities
from editcollapse.results.labels import is_collapsed

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def batched(smollm2):
    return sentence_perplexities(smollm2, load_me_ppl(50), batch_size=16, progress=False)


def test_me_ppl_50_of_the_unedited_model(batched):
    # measured on CPU, float32: mean 167.29, median 113.10 (dividing by all N tokens instead of the
    # N-1 predicted ones, or scoring padding, moves the mean out of this band)
    assert np.isfinite(batched).all() and (batched > 1).all()
    assert 160 < batched.mean() < 175
    assert 105 < np.median(batched) < 120
    assert not is_collapsed(batched.mean())


def test_batched_equals_unbatched(smollm2, batched):
    one = sentence_perplexities(smollm2, load_me_ppl(50), batch_size=1, progress=False)
    np.testing.assert_allclose(batched, one, rtol=1e-4)
