"""HardEdit (Butterfly Effect paper, Sec. 5): edits made to collapse a model, generated from HardCF's pattern.

The paper's three steps, here for any local model:

1. `pattern`: the features the collapse cases (HardCF) share, each value's share among them and among
   all of CounterFact: the subject is the prompt's first token, the subject's token count, the relation
   (the prompt with the subject replaced by '{}') and the target's token count.
2. Candidate generation behind one interface, `Generator.generate(n_calls) -> [Generation]` (raw text):
   - `EndpointGenerator`: any OpenAI-compatible chat-completions URL (HARDEDIT_ENDPOINT, HARDEDIT_MODEL,
     HARDEDIT_API_KEY), the paper's prompt filled with subjects and HardCF examples; each call within its
     timeout in all, 429 and 5xx answers retried a bounded number of times;
   - `LocalGenerator`: a local instruction model through its chat template (SmolLM2 is one);
   - `OfflineGenerator`: recombines CounterFact relations with single-token subjects, seeded.
   The chat generators append each answer to a ResultStore as it arrives (`generations_store`), so a
   stopped run resumes. `validate` parses and checks every generation; whatever fails is counted and
   dropped with its reason.
3. `filter_candidates`: one ROME edit per candidate (ranked by the guard's score first, where the guard
   exists), ME-PPL perplexity, kept when `perplexity.is_collapsed`; rows go to a ResultStore (resumable).

`write_hardedit` saves the kept cases in CounterFact format with their perplexity, generator,
generation prompt, settings and model. CLI: ``python -m editcollapse.hardcases.hardedit --help``.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import math
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .. import data

from ..eval import perplexity
from ..editors import EditError, EditRequest
from ..experiments.single import results_store, single_edit_sweep, subject_is_first_token
from ..models.loading import LoadedModel
from ..paths import atomic_write_text, cli_path, in_repo
from ..request import same_answer
from ..results.store import ResultStore
from ..models.tokens import target_ids

FIELDS = ("prompt", "subject", "target_new", "ground_truth")
CF_FIELDS = ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt", "locality_prompt",
             "locality_ground_truth")
CASE_ID_BASE = 10**8  # generated case ids start here, above CounterFact's 0..21918
GEN_KEY = ("generator", "call", "request_id")  # the key of a generations store

# The generation prompt of the paper (slides, "Dataset Construction"); {subjects}, {examples} and {excluded}
# are filled per call.
PAPER_PROMPT = """**Task Description**
1. **Generate Data Samples** : Create a set of data samples, formatted as JSON object.
2. **Components of Each Sample**:
  - **Prompts** : Combine a single-word, commonly recognized 'subject' with a 'relation'. The 'subject' should be a single word and easily identifiable.
  - **subject** : Clearly define the 'subject' for each prompt, it must be strictly one word, universally recognizable and unambiguous.
  - **target_new** : Propose a 'target_new', which is a plausible yet distinct counterfactual alternative to the 'ground_truth'. It should illustrate a potential change in output achievable through model editing.
  - **ground_truth**: Specify the 'ground_truth', ensuring it's a noun entity and relevant to the 'subject'.
3. **Sentence Formation** : Each 'prompt', combined with 'target_new' or 'ground_truth', should form a coherent sentence in the format of (subject, relation, object).
4. **Output Format** : Return the data in JSON format.

**Example Seed Sample**:
```json
{examples}
```

**You can refer to the Subjects List (JSON Format)**:
```json
{{"subjects": {subjects}}}
```

**Excluded subjects (JSON Format)**:
```json
{{"excluded_subjects": {excluded}}}
```

**Instructions**:
- Cross-reference each new 'subject' against the 'excluded_subjects' JSON array to ensure no repetition.
- Strictly ensure all 'subjects' are single-word entities, widely recognized and not compound words or phrases.
- 'target_new' and 'ground_truth' should both be nouns and contextually appropriate for the 'subject'!!!
- Creativity is encouraged in selecting 'target_new' to depict a clear **contrast** with 'ground_truth'.
- Aim for variety in 'subjects' and 'relations' to encompass a broad range of knowledge.
- Develop more varied and common 'relations' that logically link the 'subject' to an 'object', ensuring plausibility and relevance.
- Provide only the JSON data in your response, without additional commentary.
- Generate {n} data points.
- The 'subject' must be a **single** word!!!
- **target_new** must be a clearly false answer to 'prompt'!!!!"""
SEED_EXAMPLE = {"prompt": "Thunder's occupation is", "target_new": "architect", "subject": "Thunder",
                "ground_truth": "actor"}


# ---------------------------------------------------------------- 1. pattern analysis
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


def collapse_cases(source, model: str | None = None, threshold: float = perplexity.COLLAPSE_THRESHOLD) -> pd.DataFrame:
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
        hit = perplexity.is_collapsed(rows.ppl.astype(float).to_numpy(), threshold)
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


# ---------------------------------------------------------------- 2. generation
@dataclass
class Generation:
    """One answer of a generator: its message content as given (text, or whatever the server sent: `validate`
    judges it), None when the call failed (then `error` says why), and the endpoint's whole JSON answer."""

    generator: str
    prompt: str | None
    text: object  # a str, the content-parts list, or whatever else the server sent
    finish_reason: str | None = None
    error: str | None = None
    settings: dict = field(default_factory=dict)
    response: dict | None = None


def generations_store(results_dir: str | Path, model: str) -> ResultStore:
    """`<results_dir>/hardedit_generations_<model>.jsonl`: the chat generators' answers, keyed GEN_KEY."""
    return ResultStore(in_repo(results_dir) / f"hardedit_generations_{model}.jsonl", key=GEN_KEY)


def paper_prompt(subjects: list[str], examples: list[dict], excluded: list[str] = (), n: int = 10) -> str:
    """The paper's generation prompt with the subject list, the seed examples (HardCF) and excluded subjects."""
    ex = [{k: e[k] for k in ("prompt", "target_new", "subject", "ground_truth")} for e in examples] or [SEED_EXAMPLE]
    return PAPER_PROMPT.format(examples=json.dumps(ex, indent=2, ensure_ascii=False),
                               subjects=json.dumps(list(subjects), ensure_ascii=False),
                               excluded=json.dumps(list(excluded), ensure_ascii=False), n=n)


class PromptGenerator:
    """Base of the generators that ask a chat model with the paper's prompt: per call, a seeded draw of
    `n_subjects` subjects and `n_examples` HardCF examples (the seed example when there is no HardCF), and of
    the call's sampling seed."""

    name = "prompt"

    def __init__(self, subjects: list[str], examples: list[dict] = (), n_subjects: int = 30, n_examples: int = 3,
                 seed: int = 0):
        self.subjects, self.examples = list(subjects), list(examples)
        self.n_subjects, self.n_examples, self.rng = n_subjects, n_examples, random.Random(seed)
        self.used: list[str] = []

    def next_prompt(self) -> str:
        subjects = self.rng.sample(self.subjects, min(self.n_subjects, len(self.subjects)))
        examples = self.rng.sample(self.examples, min(self.n_examples, len(self.examples)))
        return paper_prompt(subjects, examples, excluded=self.used[-50:])

    @property
    def settings(self) -> dict:
        """What, besides the prompt and seed, decides an answer (part of a stored call's request_id)."""
        return {}

    def generate(self, n_calls: int, store: ResultStore | None = None) -> list[Generation]:
        """`n_calls` answers, one per prompt. With `store` (key GEN_KEY, e.g. `generations_store`) each answer is
        appended as it arrives and a call found there (same index, settings, prompt and seed) is not made again,
        so a stopped run resumes; failed calls are not stored, so a rerun retries them."""
        from tqdm.auto import tqdm

        stored = {}
        if store is not None and len(rows := store.read()):
            stored = {(r["generator"], int(r["call"]), r["request_id"]): r for r in rows.to_dict("records")}
        out = []
        with store.writing() if store is not None else contextlib.nullcontext():
            for call in tqdm(range(n_calls), desc=f"{self.name} generation"):
                prompt, seed = self.next_prompt(), self.rng.randrange(2**31)
                request_id = hashlib.sha256(json.dumps([self.settings, prompt, seed], sort_keys=True).encode()
                                            ).hexdigest()[:16]
                row = stored.get((self.name, call, request_id))
                if row is not None:
                    finish = row["finish_reason"]
                    g = Generation(self.name, prompt, row["text"], finish if isinstance(finish, str) else None,
                                   settings=row["settings"], response=row["response"])
                else:
                    g = self.ask(prompt, seed)
                    if store is not None and g.error is None:
                        store.append(dict(asdict(g), call=call, request_id=request_id))
                out.append(g)
                self.used += [s["subject"] for s in _samples(g.text)
                              if isinstance(s, dict) and isinstance(s.get("subject"), str)]
        return out

    def ask(self, prompt: str, seed: int) -> Generation:
        """One answer to `prompt`; `seed`: the call's sampling seed (a local model's; a server samples on its own)."""
        raise NotImplementedError


class EndpointGenerator(PromptGenerator):
    """An OpenAI-compatible chat-completions endpoint (POST {url}/chat/completions, or `url` itself when it ends
    in /chat/completions), through httpx.

    Each call ends within `timeout` seconds in all: connecting, sending, every byte of the answer, retries and
    waits. A 429 or 5xx answer is retried up to `max_retries` times, after its Retry-After (seconds or an HTTP
    date) or else `backoff` · 2^i seconds, either capped at `max_wait`; a wait that would pass the deadline is
    not made. `sleep` does the waiting (tests pass a fake). Every other failure becomes a failed Generation.
    """

    name = "endpoint"

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 temperature: float = 1.0, max_tokens: int = 2048, max_retries: int = 3, backoff: float = 1.0,
                 max_wait: float = 30.0, sleep=time.sleep, **kw):
        super().__init__(**kw)
        if not url or not model:
            raise ValueError("an endpoint needs a URL and a model name (HARDEDIT_ENDPOINT, HARDEDIT_MODEL)")
        for what, v, zero_ok in (("timeout", timeout, False), ("backoff", backoff, True), ("max_wait", max_wait, True)):
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not number or v < 0 or (v == 0 and not zero_ok):
                raise ValueError(f"{what} must be a finite number of seconds {'>= 0' if zero_ok else '> 0'}, not {v!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, float(timeout)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.max_retries, self.backoff, self.max_wait, self.sleep = max_retries, float(backoff), float(max_wait), sleep

    @classmethod
    def from_env(cls, **kw) -> "EndpointGenerator":
        """URL, model and key from HARDEDIT_ENDPOINT, HARDEDIT_MODEL, HARDEDIT_API_KEY (the key may be unset)."""
        return cls(os.environ.get("HARDEDIT_ENDPOINT", ""), os.environ.get("HARDEDIT_MODEL", ""),
                   os.environ.get("HARDEDIT_API_KEY"), **kw)

    @property
    def settings(self) -> dict:
        return dict(url=self.url, model=self.model, temperature=self.temperature, max_tokens=self.max_tokens)

    def _post(self, body: dict, seconds: float):
        """The answer to POST `body`, all of it within `seconds` (else TimeoutError). asyncio cancels the
        exchange at the deadline, whatever the server does; it runs in a thread of its own, so that it works
        where an event loop runs already (Jupyter)."""
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

        async def post():
            async with httpx.AsyncClient(timeout=seconds) as client:
                return await asyncio.wait_for(client.post(self.url, json=body, headers=headers), seconds)

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, post()).result()

    def _wait(self, response, attempt: int) -> float:
        """Seconds to wait before retrying: Retry-After (seconds or an HTTP date), else backoff · 2^attempt;
        at most max_wait."""
        after = response.headers.get("Retry-After", "").strip()
        try:
            wait = float(after)
        except ValueError:
            try:
                wait = email.utils.parsedate_to_datetime(after).timestamp() - time.time()
            except (TypeError, ValueError):
                wait = self.backoff * 2 ** attempt
        return min(max(wait, 0.0) if math.isfinite(wait) else self.max_wait, self.max_wait)

    def ask(self, prompt: str, seed: int | None = None) -> Generation:
        import httpx

        settings = self.settings
        body = dict(model=self.model, messages=[{"role": "user", "content": prompt}], temperature=self.temperature,
                    max_tokens=self.max_tokens)
        fail = dict(generator=self.name, prompt=prompt, text=None, settings=settings)
        deadline = time.monotonic() + self.timeout
        retries = 0
        while True:
            try:
                r = self._post(body, deadline - time.monotonic())
            except (TimeoutError, httpx.TimeoutException) as e:
                return Generation(**fail, error=f"timeout after {self.timeout:g} s in all ({type(e).__name__}; "
                                                f"{retries} retries)")
            except httpx.HTTPError as e:
                return Generation(**fail, error=f"http error: {type(e).__name__}: {e}")
            if not (r.status_code == 429 or r.status_code >= 500) or retries == self.max_retries:
                break
            wait = self._wait(r, retries)
            if time.monotonic() + wait >= deadline:
                return Generation(**fail, error=f"http error {r.status_code}: a retry in {wait:g} s would pass the "
                                                f"{self.timeout:g} s timeout ({retries} retries)")
            self.sleep(wait)
            retries += 1
        if r.status_code >= 400:
            return Generation(**fail, error=f"http error {r.status_code} ({retries} retries): {r.text[:200]}")
        try:
            answer = r.json()
            choice = answer["choices"][0]
            return Generation(self.name, prompt, choice["message"]["content"], choice.get("finish_reason"),
                              settings=settings, response=answer)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            return Generation(**fail, error=f"http error: not a chat-completions answer ({type(e).__name__}: {e})")


class LocalGenerator(PromptGenerator):
    """A local instruction model (e.g. SmolLM2-135M-Instruct) through its tokenizer's chat template, sampled."""

    name = "local"

    def __init__(self, lm: LoadedModel, max_new_tokens: int = 700, temperature: float = 0.7, top_p: float = 0.9,
                 **kw):
        super().__init__(**kw)
        if not getattr(lm.tok, "chat_template", None):
            raise ValueError(f"{lm.spec.name}'s tokenizer has no chat template: it is not an instruction model")
        self.lm, self.max_new_tokens, self.temperature, self.top_p = lm, max_new_tokens, temperature, top_p

    @property
    def settings(self) -> dict:
        return dict(model=self.lm.spec.name, temperature=self.temperature, top_p=self.top_p,
                    max_new_tokens=self.max_new_tokens)

    def ask(self, prompt: str, seed: int) -> Generation:
        import torch

        settings = self.settings
        enc = self.lm.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True).to(self.lm.device)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.lm.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=True,
                                         temperature=self.temperature, top_p=self.top_p,
                                         pad_token_id=self.lm.tok.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        stopped = bool((new == self.lm.tok.eos_token_id).any())
        return Generation(self.name, prompt, self.lm.tok.decode(new, skip_special_tokens=True),
                          "stop" if stopped else "length", settings=settings)


class OfflineGenerator:
    """Recombines CounterFact's relations with its single-token subjects (no server, seeded).

    A CounterFact case c holds a relation phrasing T_c (its prompt with '{}' for the subject), a
    counterfactual object and a neighbourhood prompt: another subject S' with the same relation and the
    same true object. Each candidate puts S' into T_c, "T_c(S') → o", where o is drawn (seeded) from the
    objects CounterFact gives relation T_c, other than the truth. c's paraphrase with S' for c's subject
    is its paraphrase, c's own prompt its locality prompt. Following the pattern, only subjects that are the
    prompt's first token (`first_token`) and have at most `max_subject_tokens` tokens are used.
    """

    name = "offline"

    def __init__(self, lm: LoadedModel, seed: int = 0, first_token: bool = True, max_subject_tokens: int = 1,
                 per_call: int = 10, counterfact: list[dict] | None = None):
        self.lm, self.seed, self.first_token, self.max_subject_tokens = lm, seed, first_token, max_subject_tokens
        self.per_call = per_call
        self.counterfact = data.load_counterfact() if counterfact is None else counterfact
        self._pool: list[dict] | None = None

    @property
    def settings(self) -> dict:
        return dict(seed=self.seed, first_token=self.first_token, max_subject_tokens=self.max_subject_tokens)

    def pool(self) -> list[dict]:
        """Every recombination the pattern allows, in a seeded order (each a sample with its recipe)."""
        if self._pool is not None:
            return self._pool
        templates: dict[str, list[dict]] = {}
        for c in self.counterfact:
            t = template_of(c)
            if t is not None:
                templates.setdefault(t, []).append(c)
        by_suffix: dict[str, list[tuple[str, str]]] = {}
        for t in templates:
            pre, suf = t.split("{}")
            by_suffix.setdefault(suf, []).append((pre, suf))
        rng = random.Random(self.seed)
        out = []
        for t, cases in templates.items():
            if self.first_token and not t.startswith("{}"):
                continue
            objects = sorted({x for c in cases for x in (c["ground_truth"], c["target_new"])})
            for c in cases:
                subject = _neighbour_subject(c["locality_prompt"], by_suffix)
                if subject is None:
                    continue
                sample = dict(prompt=t.format(subject), subject=subject, ground_truth=c["locality_ground_truth"])
                n_tokens = len(target_ids(self.lm, subject))
                if n_tokens > self.max_subject_tokens or (self.first_token and not subject_is_first_token(
                        self.lm, dict(sample, target_new="x"))):
                    continue
                wrong = [o for o in objects if not same_answer(o, sample["ground_truth"])]
                if not wrong:
                    continue
                sample["target_new"] = rng.choice(wrong)
                sample["rephrase_prompt"] = (c["rephrase_prompt"].replace(c["subject"], subject, 1)
                                             if c["subject"] in c["rephrase_prompt"] else c["locality_prompt"])
                sample["locality_prompt"], sample["locality_ground_truth"] = c["prompt"], c["ground_truth"]
                sample["recipe"] = (f"CounterFact case {c['case_id']}: its relation {t!r} with its neighbourhood "
                                    f"subject {subject!r}; target_new from the relation's objects")
                out.append(sample)
        rng.shuffle(out)
        self._pool = out
        return out

    def generate(self, n_calls: int) -> list[Generation]:
        """`n_calls` Generations of `per_call` samples each (JSON text, as the chat back ends give)."""
        pool = self.pool()
        out = []
        for i in range(0, min(n_calls * self.per_call, len(pool)), self.per_call):
            batch = pool[i:i + self.per_call]
            out.append(Generation(self.name, "; ".join(s["recipe"] for s in batch),
                                  json.dumps(batch),
                                  "stop", settings=self.settings))
        return out


def _neighbour_subject(prompt: str, by_suffix: dict) -> str | None:
    """The subject of a neighbourhood prompt: what a known relation phrasing leaves of it (the longest one)."""
    best = None
    for i in range(len(prompt) + 1):
        for pre, suf in by_suffix.get(prompt[i:], ()):
            if prompt.startswith(pre) and len(pre) < i and (best is None or len(pre) + len(suf) > best[0]):
                best = (len(pre) + len(suf), prompt[len(pre):i])
    if best is None:
        return None
    subject = best[1].strip()
    return subject if subject and subject == best[1] else None


# ---------------------------------------------------------------- validation
REFUSAL = re.compile(r"\b(I can(?:no|')t|I am (?:not able|unable)|I'm (?:sorry|unable|not able)|I apologi[sz]e|"
                     r"as an AI|I won't|I will not)\b", re.I)


def _json_start(text: str) -> int:
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    return min(starts) if starts else -1


def _samples(text) -> list:
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


# ---------------------------------------------------------------- 3. filter
def rank(lm: LoadedModel, candidates: list[dict]) -> tuple[list[dict], str]:
    """Candidates by the guard's collapse score, highest first, with "guard"; unchanged with "none" where the
    guard is not importable (requests it cannot read go last)."""
    try:
        from ..guard import key_features
    except ImportError:
        return list(candidates), "none"
    feats = key_features(lm, candidates) if candidates else pd.DataFrame(columns=["case_id", "score"])
    score = dict(zip(feats.case_id, feats.score.fillna(float("-inf"))))
    return sorted(candidates, key=lambda c: -score.get(c["case_id"], float("-inf"))), "guard"


def filter_candidates(lm: LoadedModel, candidates: list[dict], results_dir: str | Path = "results",
                      ppl_size: int = 50, limit: int | None = None, use_guard: bool = True,
                      store_name: str = "hardedit") -> pd.DataFrame:
    """ROME on each candidate (guard-ranked first, the first `limit`), ME-PPL_{ppl_size} after it, into
    `<results_dir>/<store_name>.jsonl` (rows done before are reused). Returns the rows of every candidate
    measured (now or before), with `kept` = perplexity.is_collapsed and `guard_rank`."""
    ordered, ranker = rank(lm, candidates) if use_guard else (list(candidates), "none")
    store = results_store(results_dir, store_name)
    experiment = f"hardedit_ppl{ppl_size}"
    single_edit_sweep(lm, "rome", ordered[:limit], store, experiment=experiment, ppl_size=ppl_size)
    rows = store.read()
    rows = rows.reindex(columns=[*rows.columns, *(c for c in ("error", "ppl") if c not in rows)])  # an empty store
    rows = rows[(rows.experiment == experiment) & (rows.model == lm.spec.name) & (rows.editor == "rome")]
    order = {c["case_id"]: i for i, c in enumerate(ordered)}
    rows = rows[rows.case_id.isin(order)].assign(guard_rank=lambda r: r.case_id.map(order), ranker=ranker)
    kept = rows.error.isna() & pd.Series(perplexity.is_collapsed(rows.ppl.fillna(1.0).to_numpy()), index=rows.index)
    return rows.assign(kept=kept).sort_values("guard_rank").reset_index(drop=True)


def write_hardedit(path, rows: pd.DataFrame, candidates: list[dict], meta: dict) -> list[dict]:
    """The kept cases in CounterFact format (+ ppl, generator, generation prompt, settings, model), JSON at `path`."""
    by_id = {c["case_id"]: c for c in candidates}
    out = []
    for r in rows[rows.kept].sort_values("ppl", ascending=False).itertuples():
        c = by_id[int(r.case_id)]
        out.append(dict({f: c[f] for f in CF_FIELDS}, ppl=float(r.ppl), ppl_size=int(r.ppl_size),
                        denominator=float(r.denominator), first_token=bool(r.first_token), model=meta["model"],
                        editor="rome", generator=c["generator"], generation_prompt=c["generation_prompt"],
                        settings=dict(meta.get("settings", {}), generation=c["generation_settings"]),
                        rephrase_is_prompt=c["rephrase_is_prompt"]))
    atomic_write_text(in_repo(path), json.dumps(out, indent=1, ensure_ascii=False))
    return out


def load_hardedit(path) -> list[dict]:
    """A HardEdit JSON file as edit cases (dataset 'counterfact', as `metrics` and the editors expect)."""
    return [dict(c, dataset="counterfact") for c in json.loads(in_repo(path).read_text())]


def normal_cases(lm: LoadedModel, n: int, seed: int = 0, exclude=()) -> list[dict]:
    """`n` CounterFact cases whose subject is not the prompt's first token (seeded; `exclude`: case ids)."""
    pool = [c for c in data.load_counterfact(n=20 * max(n, 1), seed=seed)
            if c["case_id"] not in set(exclude) and not subject_is_first_token(lm, c)]
    return sorted(pool[:n], key=lambda c: c["case_id"])


# ---------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """python -m editcollapse.hardcases.hardedit: pattern, generation (offline / local / endpoint), validation, filter,
    dataset in CounterFact format."""
    import argparse

    from .. import load_model

    p = argparse.ArgumentParser(prog="python -m editcollapse.hardcases.hardedit", description=main.__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--hardcf", type=cli_path, default=None, help="HardCF source: a HardCF JSON or single-edit JSONL "
                   "(default: data/hardcf/<model>.json if present, else results/single_edit.jsonl)")
    p.add_argument("--offline-calls", type=int, default=20, help="offline generations of 10 samples")
    p.add_argument("--local-calls", type=int, default=0, help="generations by the local model (chat template)")
    p.add_argument("--endpoint-calls", type=int, default=0, help="calls to HARDEDIT_ENDPOINT")
    p.add_argument("--timeout", type=float, default=120.0, help="endpoint timeout, seconds")
    p.add_argument("--limit", type=int, default=None, help="edit at most this many candidates (guard order); "
                   "0 writes the dataset from the rows measured so far")
    p.add_argument("--reuse-candidates", action="store_true", help="take the candidates of the last run "
                   "(results/hardedit_candidates_<model>.json) instead of generating")
    p.add_argument("--ppl-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=cli_path, default=in_repo("results"), help="(default: the repository's results/)")
    p.add_argument("--out", type=cli_path, default=None, help="dataset JSON (default <results-dir>/hardedit_<model>.json; the "
                   "shipped data/hardedit/ only when named)")
    a = p.parse_args(argv)

    t0 = time.time()
    lm = load_model(a.model, device=a.device)
    source = a.hardcf or next((s for s in (f"data/hardcf/hardcf_{a.model}.json", f"data/hardcf/{a.model}.json")
                               if in_repo(s).exists()), f"{a.results_dir}/single_edit.jsonl")
    hard = collapse_cases(source, model=a.model)
    table = pattern(lm, hard)
    print(f"HardCF source {source}: {len(hard)} collapse cases")
    print(table[table.feature != "relation"].to_string(index=False))
    cand_path = in_repo(a.results_dir) / f"hardedit_candidates_{a.model}.json"
    if a.reuse_candidates and cand_path.exists():
        candidates = json.loads(cand_path.read_text())
        print(f"{len(candidates)} candidates from {cand_path}")
    else:
        subjects = single_token_subjects(lm, data.load_counterfact())
        examples = hard[list(FIELDS)].to_dict("records")
        first = "True" in preferred(table, "first_token")
        chat = dict(subjects=subjects, examples=examples, seed=a.seed)
        endpoint = EndpointGenerator.from_env(**chat, timeout=a.timeout) if a.endpoint_calls else None
        store = generations_store(a.results_dir, a.model)  # the chat answers, kept as they arrive: a rerun resumes
        generations = OfflineGenerator(lm, seed=a.seed, first_token=first).generate(a.offline_calls)
        if a.local_calls:
            generations += LocalGenerator(lm, **chat).generate(a.local_calls, store)
        if endpoint is not None:
            generations += endpoint.generate(a.endpoint_calls, store)
        candidates, dropped = validate(generations, seed=a.seed)
        print(yield_table(generations, candidates, dropped).to_string(index=False))
        atomic_write_text(cand_path, json.dumps(candidates, indent=1, ensure_ascii=False))
    rows = filter_candidates(lm, candidates, a.results_dir, a.ppl_size, a.limit)
    meta = dict(model=a.model, settings=dict(editor="rome", ppl_size=a.ppl_size, seed=a.seed,
                                             threshold=perplexity.COLLAPSE_THRESHOLD, ranker=rows.ranker.iloc[0]
                                             if len(rows) else "none"))
    out = write_hardedit(a.out or f"{a.results_dir}/hardedit_{a.model}.json", rows, candidates, meta)
    by = rows.assign(generator=rows.case_id.map({c["case_id"]: c["generator"] for c in candidates}))
    print(by.groupby("generator").agg(edited=("kept", "size"), collapsed=("kept", "sum")).to_string())
    print(f"{len(candidates)} candidates, {len(rows)} edited, {len(out)} collapse cases kept "
          f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
