"""HardEdit step 2 (Butterfly Effect paper, Sec. 5): candidate generation behind one interface,
`generate(n_calls) -> [Generation]` (raw text, judged later by `validate`).

- `PromptGenerator`: the paper's prompt filled with subjects and HardCF examples; its answers are appended to a
  ResultStore as they arrive (`generations_store`), so a stopped run resumes. `LocalGenerator` asks a local
  instruction model through its chat template (SmolLM2 is one); `endpoint.EndpointGenerator` any
  OpenAI-compatible server;
- `OfflineGenerator`: recombines CounterFact relations with single-token subjects, seeded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import data
from ..experiments.single import subject_is_first_token
from ..models.loading import LoadedModel
from ..models.tokens import target_ids
from ..paths import in_repo
from ..request import same_answer
from ..results.store import ResultStore
from .pattern import template_of
from .validate import samples

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
                self.used += [s["subject"] for s in samples(g.text)
                              if isinstance(s, dict) and isinstance(s.get("subject"), str)]
        return out

    def ask(self, prompt: str, seed: int) -> Generation:
        """One answer to `prompt`; `seed`: the call's sampling seed (a local model's; a server samples on its own)."""
        raise NotImplementedError


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
