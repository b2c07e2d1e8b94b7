"""HardEdit's validation (Butterfly Effect paper, Sec. 5): every generation parsed and checked; whatever fails is
counted and dropped with its reason; the valid samples become CounterFact cases."""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from typing import TYPE_CHECKING

import pandas as pd

from .. import data
from ..editors import EditError, EditRequest
from ..request import same_answer
from .pattern import FIELDS

if TYPE_CHECKING:
    from .generate import Generation

CF_FIELDS = ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality_prompt",
             "locality_ground_truth")
CASE_ID_BASE = 10**8  # generated case ids start here, above CounterFact's 0..21918
REFUSAL = re.compile(r"\b(I can(?:no|')t|I am (?:not able|unable)|I'm (?:sorry|unable|not able)|I apologi[sz]e|"
                     r"as an AI|I won't|I will not)\b", re.I)


def _json_start(text: str) -> int:
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    return min(starts) if starts else -1


def samples(text) -> list:
    """The list of samples in a generation's text ([] when there is none; no checks)."""
    try:
        return _parse(text)
    except ValueError:
        return []


def content_text(content) -> str:
    """A message's content as text: a string, or the OpenAI content-parts form [{"type": "text", "text": ...}]
    (the text parts joined). Otherwise ValueError('bad_content: ...'), or 'refusal: ...' for a refusal part."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "refusal":
                raise ValueError(f"refusal: a refusal part: {str(part.get('refusal'))[:80]!r}")
            else:
                raise ValueError(f"bad_content: a content part that is not text: {part!r:.80}")
        return "".join(texts)
    raise ValueError(f"bad_content: the message content is a {type(content).__name__} ({content!r:.80}), not text")


def _parse(text, finish_reason: str | None = None) -> list:
    """The samples of a generation, or ValueError('reason: detail'): empty, bad_content, refusal, truncated,
    malformed_json."""
    if text is None:
        raise ValueError("empty: the answer has no text")
    text = content_text(text)
    if not text.strip():
        raise ValueError("empty: the answer has no text")
    start = _json_start(text)
    if start < 0:
        kind = "refusal" if REFUSAL.search(text) else "malformed_json"
        raise ValueError(f"{kind}: no JSON in {text.strip()[:80]!r}")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        rest = text[start:].rstrip(" \n`'")
        cut = finish_reason == "length" or e.pos >= len(rest) or e.msg.startswith("Unterminated string")
        raise ValueError(f"{'truncated' if cut else 'malformed_json'}: {e.msg} at character {e.pos}") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(obj) == 1 and lists else [obj]
    if not isinstance(obj, list):
        raise ValueError(f"malformed_json: a JSON {type(obj).__name__}, not a list of samples")
    return obj


def check_sample(sample, seen_counterfact: set, seen: set) -> str | None:
    """The reason a sample is invalid ('missing_field: ...', 'subject_not_in_prompt', 'same_target',
    'duplicate_counterfact', 'duplicate_candidate'), or None. `seen` gains the valid sample's key."""
    if not isinstance(sample, dict):
        return f"malformed_sample: a JSON {type(sample).__name__}, not an object"
    missing = [f for f in FIELDS if not isinstance(sample.get(f), str) or not sample[f].strip()]
    if missing:
        return f"missing_field: {', '.join(missing)}"
    try:
        EditRequest(sample["prompt"].strip(), sample["subject"].strip(), sample["target_new"].strip()).template()
    except EditError as e:
        return f"subject_not_in_prompt: {e}"
    if same_answer(sample["target_new"], sample["ground_truth"]):
        return "same_target: target_new equals ground_truth"
    key = _norm(sample["prompt"])
    if key in seen_counterfact:
        return "duplicate_counterfact: the prompt of a CounterFact case"
    if key in seen:
        return "duplicate_candidate: the prompt of another candidate"
    seen.add(key)
    return None


def _norm(prompt: str) -> str:
    return " ".join(prompt.casefold().split())


def case_id_of(sample: dict) -> int:
    """A stable id for a generated case, from its prompt and target (CASE_ID_BASE and above)."""
    h = hashlib.sha256(f"{_norm(sample['prompt'])}\t{sample['target_new'].strip().casefold()}".encode()).hexdigest()
    return CASE_ID_BASE + int(h[:12], 16) % 10**12


def validate(generations: list[Generation], counterfact: list[dict] | None = None, seed: int = 0,
             seen: set | None = None) -> tuple[list[dict], pd.DataFrame]:
    """(valid candidates as CounterFact cases, one row per dropped generation or sample with its `reason`).

    Checks: the content is text or text parts (else bad_content), it holds JSON (else empty / refusal / truncated /
    malformed_json), every field is a non-empty string,
    the subject is a whole word of the prompt, target_new differs from ground_truth, and the prompt is neither a
    CounterFact prompt nor another candidate's. Failed calls (HTTP error, timeout) are dropped as `error`.
    Candidates without a paraphrase or a locality prompt get the prompt as paraphrase and a seeded CounterFact
    case as locality prompt (`rephrase_is_prompt` marks them). A sample's own `recipe` (offline) replaces the
    generation's prompt as its `generation_prompt`."""
    counterfact = data.load_counterfact() if counterfact is None else counterfact
    seen_cf = {_norm(c["prompt"]) for c in counterfact}
    seen = set() if seen is None else seen
    rng = random.Random(seed)
    kept, dropped = [], []
    for i, g in enumerate(generations):
        base = dict(generation=i, generator=g.generator)
        if g.error is not None:
            dropped.append(dict(base, reason=g.error.split(" ")[0] if g.error.startswith("timeout") else "error",
                                detail=g.error))
            continue
        try:
            samples = _parse(g.text, g.finish_reason)
        except ValueError as e:
            reason, _, detail = str(e).partition(": ")
            dropped.append(dict(base, reason=reason, detail=detail))
            continue
        for s in samples:
            why = check_sample(s, seen_cf, seen)
            if why is not None:
                reason, _, detail = why.partition(": ")
                dropped.append(dict(base, reason=reason, detail=detail or None, sample=json.dumps(s)[:300]))
                continue
            case = {f: s[f].strip() for f in FIELDS}
            if all(isinstance(s.get(f), str) and s[f].strip() for f in CF_FIELDS[5:]):
                case.update({f: s[f] for f in CF_FIELDS[5:]}, rephrase_is_prompt=False)
            else:
                loc = rng.choice(counterfact)
                case.update(rephrase_prompt=case["prompt"], locality_prompt=loc["prompt"],
                            locality_ground_truth=loc["ground_truth"], rephrase_is_prompt=True)
            kept.append(dict(case, case_id=case_id_of(case), dataset="counterfact", generator=g.generator,
                             generation_prompt=s.get("recipe", g.prompt), generation_settings=g.settings))
    return kept, pd.DataFrame(dropped, columns=["generation", "generator", "reason", "detail", "sample"])


def yield_table(generations: list[Generation], candidates: list[dict], dropped: pd.DataFrame) -> pd.DataFrame:
    """Per generator: calls, failed calls, samples dropped by reason, valid candidates."""
    rows = []
    for name in sorted({g.generator for g in generations}):
        d = dropped[dropped.generator == name]
        rows.append(dict(generator=name, calls=sum(g.generator == name for g in generations),
                         valid=sum(c["generator"] == name for c in candidates),
                         **{f"dropped_{k}": v for k, v in Counter(d.reason).items()}))
    return pd.DataFrame(rows).fillna(0)
