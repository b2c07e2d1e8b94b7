"""The one collapse rule: ME-PPL above the threshold (NaN and inf count), and above 2x the unedited perplexity
where that is known; on numbers, arrays and Series."""
import numpy as np
import pandas as pd
import pytest

from editcollapse.results.labels import COLLAPSE_THRESHOLD, MIN_RATIO, collapse_report, is_collapsed


def test_the_papers_threshold_on_numbers():
    assert COLLAPSE_THRESHOLD == 1000 and MIN_RATIO == 2
    assert not is_collapsed(999.0) and not is_collapsed(1000.0) and is_collapsed(1000.5)
    assert is_collapsed(1001) and not is_collapsed(np.float32(12.5)) and is_collapsed(np.int64(5000))
    assert is_collapsed(float("inf")) and is_collapsed(float("nan"))
    assert type(is_collapsed(5000.0)) is bool
    assert is_collapsed(150.0, threshold=100) and not is_collapsed(150.0, threshold=np.float64(200))


def test_arrays_and_series_keep_their_shape_and_index():
    got = is_collapsed([10.0, 2e3, np.nan, np.inf], threshold=100)
    assert isinstance(got, np.ndarray) and got.dtype == bool and got.tolist() == [False, True, True, True]
    ppl = pd.Series([5000.0, 120.0, np.nan], index=[7, 3, 9])
    flags = is_collapsed(ppl)
    assert isinstance(flags, pd.Series) and flags.index.tolist() == [7, 3, 9] and flags.tolist() == [True, False, True]
    assert ppl[flags].index.tolist() == [7, 9]  # usable as a mask of the rows it came from
    assert is_collapsed(np.array([[2e3, 1.0]])).shape == (1, 2)


def test_the_ratio_to_the_unedited_perplexity_where_it_is_known():
    assert is_collapsed(1500.0, ppl_original=700.0)  # 1500 > 2 x 700
    assert not is_collapsed(1500.0, ppl_original=800.0)  # above the threshold, but not twice the unedited
    assert not is_collapsed(1600.0, ppl_original=800.0)  # exactly twice is not more than twice
    assert not is_collapsed(900.0, ppl_original=100.0)  # twice, but under the threshold
    assert is_collapsed(float("nan"), ppl_original=800.0) and is_collapsed(float("inf"), ppl_original=800.0)
    got = is_collapsed([1500.0, 1500.0, 1500.0], ppl_original=[700.0, 800.0, np.nan])  # NaN: unknown, no ratio test
    assert got.tolist() == [True, False, True]
    series = is_collapsed(pd.Series([5000.0, 1500.0], index=["a", "b"]), ppl_original=800.0)
    assert series.to_dict() == {"a": True, "b": False}


def test_what_is_not_a_perplexity_is_refused():
    for bad in (None, [None], [1.0, None], "5", [True], {"ppl": 5.0}):
        with pytest.raises(ValueError, match="is_collapsed needs a perplexity or an array of them"):
            is_collapsed(bad)
    for threshold in (None, "1000", float("nan"), 0.5, True):
        with pytest.raises(ValueError, match="threshold must be a perplexity"):
            is_collapsed(5.0, threshold=threshold)
    with pytest.raises(ValueError, match=">= 1"):
        is_collapsed([2.0, 0.5])


def test_collapse_report():
    rep = collapse_report(5000.0, 50.0)
    assert rep == dict(ppl=5000.0, ratio=100.0, collapsed=True)
    assert collapse_report(150.0, 50.0, threshold=100.0)["collapsed"]
    assert not collapse_report(150.0, 50.0)["collapsed"]
    with pytest.raises(ValueError, match="unedited"):
        collapse_report(5000.0, float("inf"))
