"""Notebook 06's study on hand-made rows: the seeded split, the tables' shares and intervals, the targets."""
import math

import numpy as np
import pandas as pd
import pytest

from editcollapse.analysis import safe_edit


def test_the_split_is_seeded_stable_and_about_half():
    ids = range(2000)
    first = [safe_edit.split_of(i) for i in ids]
    assert first == [safe_edit.split_of(i, seed=0) for i in ids]
    assert 0.45 < first.count("tune") / len(first) < 0.55
    assert first != [safe_edit.split_of(i, seed=1) for i in ids]


def rows(editor, sample, ppl, eff, gen=1.0, loc=1.0, split="test"):
    return [dict(editor=editor, sample=sample, case_id=i, dataset="counterfact", error=None, ppl=p, efficacy_acc=e,
                 generalization_acc=gen, locality_acc=loc, rel_change=0.1, seconds_edit=1.0, split=split)
            for i, (p, e) in enumerate(zip(ppl, eff))]


def test_single_table_counts_edits_within_the_perplexity_bound_on_the_test_half_only():
    table = pd.DataFrame(rows("rome-2k", "hardcf", [100, 110, 130, 90], [1, 1, 0, 1])
                         + rows("rome-2k", "hardcf", [1e6], [0], split="tune"))
    t = safe_edit.single_table(table, ppl_original=100.0)
    r = t.loc[("rome-2k", "hardcf")]
    assert r.edits == 4 and r.within_ppl == pytest.approx(0.75) and r.max_ppl_ratio == pytest.approx(1.3)
    assert r.within_ppl_lo < 0.75 < r.within_ppl_hi and r.efficacy_acc == pytest.approx(0.75)
    assert safe_edit.single_table(table, 100.0, split=None).loc[("rome-2k", "hardcf")].edits == 5


def test_targets_hold_each_value_against_its_reference():
    table = pd.DataFrame(rows("rome-2k", "hardcf", [100, 101], [1, 1], gen=0.5, loc=0.9)
                         + rows("rome", "normal", [100, 100], [1, 1], gen=0.4)
                         + rows("c-rome", "hardcf", [100, 100], [0, 0], loc=0.95)
                         + rows("rome-2k", "normal", [100, 100], [1, 1], gen=0.4))
    single = safe_edit.single_table(table, 100.0)
    goals = safe_edit.targets(single, "rome-2k", hard=("hardcf",)).set_index("target")
    assert goals.loc["hardcf: bare-prompt efficacy ≥ 0.9", "met"]
    assert goals.loc["hardcf: generalisation ≥ ROME's on normal cases", "met"]
    assert not goals.loc["hardcf: locality ≥ C-ROME's", "met"]  # 0.9 < 0.95
    assert goals.loc["hardcf: every edit within 1.2× the unedited ME-PPL", "met"]
    missing = safe_edit.targets(single, "rome-2k", hard=("hardedit",)).set_index("target")
    assert math.isnan(missing.loc["hardedit: bare-prompt efficacy ≥ 0.9", "value"])
    assert pd.isna(missing.loc["hardedit: bare-prompt efficacy ≥ 0.9", "met"])


def test_sequential_table_finds_the_first_step_over_the_bound_and_the_retention():
    steps = pd.DataFrame(dict(editor="rome-2k", run="hard", step=range(4), ppl=[100, 150, 250, 120],
                              error=None, efficacy_acc=[np.nan, 1, 1, 0]))
    kept = pd.DataFrame(dict(editor="rome-2k", run="hard", edited_at=[1, 2, 3], efficacy_acc=[1.0, 0.0, 1.0],
                             efficacy_prob=[1.0, 1.0, 1.0]))
    r = safe_edit.sequential_table(steps, kept, 100.0).loc[("rome-2k", "hard")]
    assert r.first_step_over == 2 and r.max_ppl_ratio == pytest.approx(2.5) and r.steps == 3
    assert r.retained_n == 3 and r.retained_efficacy_acc == pytest.approx(2 / 3)
    assert r.efficacy_acc_when_edited == pytest.approx(2 / 3)
    collapsing = steps.assign(editor="rome", ppl=[100, 150, 25000, 30000])
    table = safe_edit.sequential_table(pd.concat([steps, collapsing]), pd.concat([kept, kept.assign(editor="rome")]),
                                       100.0)
    lines = safe_edit.readme_sequential_rows(table, {"rome-2k": "two-key", "rome": "ROME", "memit": "absent"}, "hard")
    assert lines[0].startswith("| two-key | 3 | 2 | 2.50× | 0.67 | 0.67 (") and lines[1].startswith("| ROME | 3 | 2 | 300×")
    assert len(lines) == 2


def test_a_locality_prompt_shares_the_first_position_only_without_bos(tiny_models):
    """Without BOS, position 0's hidden state is the first token's alone: the same key in both prompts."""
    import torch

    from editcollapse.models.keys import keys_and_values

    case = dict(prompt="Paris is the capital of", locality_prompt="Paris Hilton is the heir of")
    other = dict(case, locality_prompt="Rome is the capital of")
    gpt2, llama = tiny_models("tiny-gpt2"), tiny_models("tiny-llama")
    assert safe_edit.shares_first_position(gpt2, case) and not safe_edit.shares_first_position(gpt2, other)
    assert not safe_edit.shares_first_position(llama, case)  # BOS comes first
    k, _ = keys_and_values(gpt2, 1, [case["prompt"], case["locality_prompt"]], [0, 0])
    torch.testing.assert_close(k[0], k[1])


def test_bare_key_cosines_are_one_for_prompts_that_share_their_first_position(tiny_models):
    """Two prompts that begin with the same subject have the same k^u (causal attention): cosine 1;
    the table's statistics are those of the keys read by hand."""
    import torch

    from editcollapse.models.keys import keys_and_values

    lm = tiny_models("tiny-gpt2")
    same = [dict(prompt="Paris is the capital of", subject="Paris", target_new="Italy"),
            dict(prompt="Paris Hilton was born in", subject="Paris", target_new="Rome")]
    mixed = same[:1] + [dict(prompt="The city of Rome is in", subject="Rome", target_new="France")]
    table = safe_edit.bare_key_cosines(lm, 1, dict(same=same, mixed=mixed, one=same[:1]))
    assert list(table.index) == ["same", "mixed"]
    assert table.loc["same", "cosine_median"] == pytest.approx(1.0)
    from editcollapse.models.tokens import subject_last_index

    paris, rome = subject_last_index(lm, "{} is", "Paris"), subject_last_index(lm, "The city of {} is in", "Rome")
    K, _ = keys_and_values(lm, 1, [c["prompt"] for c in mixed], [paris, rome])
    expected = torch.nn.functional.cosine_similarity(K[0], K[1], dim=0).item()
    assert table.loc["mixed", "cosine_median"] == pytest.approx(expected, rel=1e-5)
    assert table.loc["mixed", "norm_median"] == pytest.approx(K.norm(dim=1).median().item(), rel=1e-5)
