"""HardEdit step 1 (Butterfly Effect paper, Sec. 5): the pattern of the collapse cases (HardCF).

The features the collapse cases share, each value's share among them and among all of CounterFact: the
subject is the prompt's first token, the subject's token count, the relation (the prompt with the subject
replaced by '{}') and the target's token count.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .. import data
from ..editors import EditError, EditRequest
from ..experiments.single import subject_is_first_token
from ..models.loading import LoadedModel
from ..models.tokens import target_ids
from ..paths import in_repo
from ..results.labels import COLLAPSE_THRESHOLD, is_collapsed

FIELDS = ("prompt", "subject", "target_new", "ground_truth")


def template_of(case: dict) -> str | None:
    """The relation of a case: its prompt with the subject replaced by '{}' (None if it cannot be)."""
    try:
        return EditRequest.from_case(case).template()
    except EditError:
        return None


def case_features(lm: LoadedModel, cases) -> pd.DataFrame:
    """One row per case: first_token, subject_tokens, relation, target_tokens (this model's tokenizer)."""
    rows = []
    for c in cases:
        rows.append(dict(case_id=c.get("case_id"), first_token=subject_is_first_token(lm, c),
                         subject_tokens=len(target_ids(lm, c["subject"].strip())),
                         relation=template_of(c),
                         target_tokens=len(target_ids(lm, c["target_new"].strip()))))
    return pd.DataFrame(rows, columns=["case_id", "first_token", "subject_tokens", "relation", "target_tokens"])


def hardcf_source(model: str, results_dir: str | Path = "results") -> str:
    """The default HardCF source of `model`: its shipped data/hardcf/ file if there is one, else the single-edit
    rows of `results_dir`."""
    return next((s for s in (f"data/hardcf/hardcf_{model}.json", f"data/hardcf/{model}.json") if in_repo(s).exists()),
                f"{results_dir}/single_edit.jsonl")


def collapse_cases(source, model: str | None = None, threshold: float = COLLAPSE_THRESHOLD) -> pd.DataFrame:
    """HardCF as a DataFrame of collapse cases, from a DataFrame of single-edit rows (columns `collapsed` or
    `ppl`), a HardCF JSON file (a list of cases, all collapse cases) or a results JSONL file.

    Rows of `model`, of ROME and measured on ME-PPL_50 only, where those columns exist; errors are left out."""
    if isinstance(source, (str, Path)):
        path = in_repo(source)
        if not path.exists():
            raise FileNotFoundError(f"no HardCF source at {path}: give single-edit rows or a HardCF JSON file")
        source = pd.read_json(path, lines=path.suffix == ".jsonl")
        if "collapsed" not in source and "ppl" not in source:
            source = source.assign(collapsed=True)  # a HardCF file holds collapse cases only
    if not isinstance(source, pd.DataFrame):
        raise TypeError(f"HardCF source must be a DataFrame or a path, not {type(source).__name__}")
    rows = source
    if model is not None and "model" in rows:
        rows = rows[rows.model == model]
    if "editor" in rows:
        rows = rows[rows.editor == "rome"]
    if "error" in rows:
        rows = rows[rows.error.isna()]
    if "ppl_size" in rows:
        rows = rows[rows.ppl_size == 50]  # the collapse test is defined on ME-PPL_50
    if "collapsed" in rows:
        hit = rows.collapsed.fillna(False).astype(bool)
    elif "ppl" in rows:
        hit = is_collapsed(rows.ppl.astype(float).to_numpy(), threshold)
    else:
        raise ValueError("HardCF rows need a `collapsed` or a `ppl` column")
    missing = [f for f in FIELDS if f not in rows]
    if missing:
        raise ValueError(f"HardCF rows lack the case field(s) {missing}")
    return rows[hit].drop_duplicates("case_id" if "case_id" in rows else list(FIELDS)).reset_index(drop=True)


def _buckets(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in ("subject_tokens", "target_tokens"):
        out[col] = out[col].clip(upper=4).astype(int).astype(str).replace("4", "4+")
    out["first_token"] = out.first_token.astype(bool).astype(str)
    return out


def pattern(lm: LoadedModel, hard: pd.DataFrame, reference: list[dict] | None = None) -> pd.DataFrame:
    """Per feature value: its share among the collapse cases (`rate_collapse`) and among `reference`
    (all of CounterFact by default), their ratio `lift`, and the counts. Sorted by feature, then lift."""
    reference = data.load_counterfact() if reference is None else reference
    h = _buckets(case_features(lm, hard.to_dict("records")))
    r = _buckets(case_features(lm, reference))
    parts = []
    for feat in ("first_token", "subject_tokens", "relation", "target_tokens"):
        hc, rc = h[feat].value_counts(), r[feat].value_counts()
        t = pd.DataFrame(dict(n_collapse=hc, n_counterfact=rc)).fillna(0).astype(int)
        t = t[t.n_collapse > 0] if feat == "relation" else t
        t["rate_collapse"] = t.n_collapse / max(len(h), 1)
        t["rate_counterfact"] = t.n_counterfact / len(r)
        t["lift"] = t.rate_collapse / t.rate_counterfact.where(t.rate_counterfact > 0)
        parts.append(t.rename_axis("value").reset_index().assign(feature=feat)
                     .sort_values(["lift", "n_collapse"], ascending=False))
    cols = ["feature", "value", "rate_collapse", "rate_counterfact", "lift", "n_collapse", "n_counterfact"]
    return pd.concat(parts, ignore_index=True)[cols]


def single_token_subjects(lm: LoadedModel, cases) -> list[str]:
    """The distinct subjects of `cases` that are one token for this model (the chat generators' subject list)."""
    return sorted({c["subject"] for c in cases if len(target_ids(lm, c["subject"])) == 1})


def preferred(table: pd.DataFrame, feature: str) -> list[str]:
    """The values of `feature` that are more common among collapse cases than in CounterFact (lift > 1)."""
    t = table[(table.feature == feature) & (table.lift > 1)]
    return list(t.value)
