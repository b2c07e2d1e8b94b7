"""ROME's key statistics: the uncentred second moment C = E[k kᵀ] of the keys over a corpus.

The key k is the INPUT of the MLP output projection (`spec.mlp_out`: Llama `down_proj`,
GPT-2 `c_proj`, GPT-J `fc_out`) at one layer, over every token of a text corpus. ROME
(Meng et al. 2022, Sec. 3.1 and Eq. 2) inserts a fact with the rank-one update

    Δ = (v* − W k*) (C⁻¹ k*)ᵀ / ((C⁻¹ k*)ᵀ k*)

so that directions common in the corpus are changed least; `Moment.inv_apply(k)` gives C⁻¹k
(the editor uses k itself when `mom2_adjustment` is off). As in ROME's `layer_stats` and
`SecondMoment`, C = Σ k kᵀ / N is accumulated in float64 over the non-padding positions of
batches, running each forward pass only up to the layer. Differences from ROME: the corpus is
the shipped WikiText-2 test set (ROME: ~44M tokens of Wikipedia) read as one token stream cut
into windows of `seq_len` tokens, in a seeded random order, of which the first `n_tokens`
positions are used; see docs/stats_convergence.md for how many tokens suffice.

C is a statistic of the unedited model: with edits applied, it is computed with their tensors
put back to their unedited values (`live.unedited`), as ROME's code computes it once, before any
edit. The disk cache is keyed by the request (model, module, corpus, tokens, window, dtype) and by
a fingerprint of the unedited weights that the keys depend on (`live.fingerprint`: embeddings and
the layers up to the edited one), so a C is never served to other weights.

Without a BOS token (SmolLM2, GPT-2, GPT-J) position 0 of every window is an ordinary word
that carries the first-token anomaly; `skip_first=True` leaves position 0 out of C
(default off, as in ROME). `first_token_share` measures how much of trace(C) it contributes.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data import load_wikitext
from .keys import read_keys
from .live import fingerprint, parameters_through, unedited
from .loading import LoadedModel
from .nethook import TraceDict
from ..paths import atomic_write_text, cache_dir

CORPORA = {"wikitext": load_wikitext}
DEFAULT_N_TOKENS = None  # the whole corpus (~302k SmolLM2 tokens of WikiText-2): docs/stats_convergence.md
DEFAULT_SEQ_LEN = 1024  # ROME: texts truncated to GPT-2's 1,024 positions
DEFAULT_BATCH_TOKENS = 4096
SEED = 0  # order of the windows
_RESULT_KEYS = ("count", "d_k", "created")  # metadata that describes the result, not the request
_PER_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()  # model_moments
_TOKENS: "weakref.WeakKeyDictionary[object, dict[str, list[int]]]" = weakref.WeakKeyDictionary()  # per tokenizer


@dataclass
class Moment:
    """C = E[k kᵀ] (float64, [d_k, d_k]) with the metadata of its computation (incl. `count`)."""

    C: torch.Tensor
    meta: dict
    _chol: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def count(self) -> int:
        return self.meta["count"]

    def inv_apply(self, k: torch.Tensor) -> torch.Tensor:
        """x = C⁻¹ k, solving C x = k in float64 with a cached Cholesky factor; k is [d_k] or [m, d_k] (rows).

        Returned in k's dtype and device. Raises ValueError when C is not positive definite.
        """
        d = self.C.shape[0]
        if k.shape[-1] != d or k.dim() > 2:
            raise ValueError(f"k must be [{d}] or [m, {d}], not {list(k.shape)}")
        L = self.cholesky()
        rhs = k.reshape(-1, d).to(device=L.device, dtype=torch.float64).T
        return torch.cholesky_solve(rhs, L).T.reshape(k.shape).to(device=k.device, dtype=k.dtype)

    def cholesky(self) -> torch.Tensor:
        """L with C = L Lᵀ (float64), computed once; ValueError when C is not positive definite."""
        if self._chol is None:
            L, info = torch.linalg.cholesky_ex(self.C.double())
            if info:
                d = self.C.shape[0]
                raise ValueError(f"C is not positive definite (leading minor {int(info)} of {d}); it holds "
                                 f"{self.count} keys of dimension {d}: use more tokens")
            self._chol = L
        return self._chol


# ---------------------------------------------------------------- corpus windows
def resolve_seq_len(lm: LoadedModel, seq_len: int | None) -> int:
    """`seq_len`, or min(1024, the model's positions) when None; checked against the model."""
    max_pos = getattr(lm.model.config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    seq_len = min(DEFAULT_SEQ_LEN, max_pos) if seq_len is None else seq_len
    if not 2 <= seq_len <= max_pos:
        raise ValueError(f"seq_len must be in [2, {max_pos}] for {lm.spec.name}, not {seq_len}")
    return seq_len


def corpus_windows(lm: LoadedModel, corpus: str = "wikitext", seq_len: int | None = None,
                   seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as one token stream (lines joined by newlines) cut into windows, in a seeded random order.

    Each window holds `seq_len` tokens: BOS plus seq_len − 1 corpus tokens for a model that
    takes BOS, seq_len corpus tokens otherwise; the last one is shorter. Returns ids
    [W, seq_len] (right-padded with the pad id) and lengths [W].
    """
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(CORPORA)}")
    seq_len = resolve_seq_len(lm, seq_len)
    tokens = _TOKENS.setdefault(lm.tok, {})
    if corpus not in tokens:
        tokens[corpus] = lm.token_ids("\n".join(CORPORA[corpus]()))[1 if lm.spec.prepend_bos else 0:]
    bos = [lm.tok.bos_token_id] if lm.spec.prepend_bos else []
    step = seq_len - len(bos)
    stream = tokens[corpus]
    rows = [torch.tensor(bos + stream[i:i + step]) for i in range(0, len(stream), step)]
    pad = lm.tok.pad_token_id if lm.tok.pad_token_id is not None else 0
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    lengths = torch.tensor([len(r) for r in rows])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    return ids[order], lengths[order]


def take_tokens(ids: torch.Tensor, lengths: torch.Tensor, n_tokens: int | None):
    """The first `n_tokens` positions of the windows (the last window used is cut short); all when None."""
    if n_tokens is None:
        return ids, lengths
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive integer or None, not {n_tokens}")
    before = lengths.cumsum(0) - lengths
    keep = int((before < n_tokens).sum())
    lengths = lengths[:keep].clone()
    lengths[-1] = min(int(lengths[-1]), n_tokens - int(before[keep - 1]))
    return ids[:keep], lengths


def _batches(lm: LoadedModel, ids: torch.Tensor, lengths: torch.Tensor, batch_tokens: int, desc: str):
    """Yield (input_ids, attention_mask) batches of batch_tokens // seq_len windows, with a token progress bar."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, not {batch_tokens}")
    per = max(1, batch_tokens // ids.shape[1])
    with tqdm(total=int(lengths.sum()), unit="tok", unit_scale=True, desc=desc) as bar:
        for i in range(0, len(ids), per):
            ln = lengths[i:i + per]
            width = int(ln.max())
            mask = torch.arange(width) < ln[:, None]
            yield ids[i:i + per, :width].to(lm.device), mask.to(lm.device)
            bar.update(int(ln.sum()))


# ---------------------------------------------------------------- accumulation
def _accumulate(lm: LoadedModel, modules: list[str], ids: torch.Tensor, lengths: torch.Tensor, batch_tokens: int,
                dtype: torch.dtype, skip_first: bool, marks=()) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Σ k kᵀ and the number of keys of each module's input, over non-padding positions (and not
    position 0 with skip_first), all modules in one forward pass that stops after the last of them.

    Returns {module: [..., (S, count)]}: the final sums, preceded by a snapshot after the first
    batch whose count reaches each of `marks` (ascending).
    """
    order = {name: i for i, (name, _) in enumerate(lm.model.named_modules())}
    modules = sorted(modules, key=order.__getitem__)  # forward order: the pass stops after the last
    S, count, out, todo = dict.fromkeys(modules), 0, {m: [] for m in modules}, sorted(marks)
    desc = f"C = E[kkᵀ] {modules[0]}" + (f" (+{len(modules) - 1} more)" if len(modules) > 1 else "")
    for x, mask in _batches(lm, ids, lengths, batch_tokens, desc=desc):
        with torch.no_grad(), TraceDict(lm.model, modules, retain_input=True, stop=True) as td:
            lm.model(input_ids=x, attention_mask=mask.long())
        if skip_first:
            mask[:, 0] = False
        for m in modules:
            k = td[m].input[mask].to(dtype)
            S[m] = k.T @ k if S[m] is None else S[m].addmm_(k.T, k)
        count += int(mask.sum())
        while todo and count >= todo[0]:
            for m in modules:
                out[m].append((S[m].clone(), count))
            todo.pop(0)
    return {m: out[m] + [(S[m], count)] for m in modules}


def _moment(S: torch.Tensor, count: int, meta: dict) -> Moment:
    C = (S / count).double().cpu()
    return Moment((C + C.T) / 2, dict(meta, count=count, d_k=C.shape[0]))


def _request(lm, layer, n_tokens, corpus, dtype, seq_len, skip_first, memo: dict | None = None) -> dict:
    """The metadata that names a C: what was asked for, the library version and the weights (`memo`: see
    live.fingerprint)."""
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer {layer} out of range for {lm.spec.name} ({lm.n_layers} layers)")
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens < 1):
        raise ValueError(f"n_tokens must be a positive integer or None, not {n_tokens!r}")
    return dict(model=lm.spec.name, layer=layer, module=lm.spec.module("mlp_out", layer), corpus=corpus,
                n_tokens=n_tokens, seq_len=resolve_seq_len(lm, seq_len), dtype=str(dtype).removeprefix("torch."),
                skip_first=skip_first, seed=SEED, version=importlib.metadata.version("editcollapse"),
                weights=fingerprint(lm, parameters_through(lm, layer), memo))


def cache_path(meta: dict) -> Path:
    """cache_dir()/stats/<model>/<module>_<corpus>_n<N|all>_T<seq_len>_<dtype>[_skip0]_w<weights>.safetensors"""
    name = (f"{meta['module']}_{meta['corpus']}_n{meta['n_tokens'] or 'all'}_T{meta['seq_len']}_{meta['dtype']}"
            f"{'_skip0' if meta['skip_first'] else ''}_w{meta['weights']}.safetensors")
    return cache_dir() / "stats" / meta["model"] / name


def _load(path: Path, request: dict) -> Moment | None:
    sidecar = path.with_suffix(".json")
    if not (path.exists() and sidecar.exists()):
        return None
    meta = json.loads(sidecar.read_text())
    if {k: v for k, v in meta.items() if k not in _RESULT_KEYS} != request:
        return None
    return Moment(load_file(path)["C"], meta)


def _save(path: Path, m: Moment) -> None:
    """Write the tensor, then its JSON sidecar, each to a temporary file renamed into place (a C without
    its sidecar is never read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({"C": m.C.contiguous()}, tmp)
    os.replace(tmp, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(m.meta, indent=1))


def second_moment(lm: LoadedModel, layer: int, n_tokens: int | None = DEFAULT_N_TOKENS, corpus: str = "wikitext",
                  dtype: torch.dtype = torch.float64, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  seq_len: int | None = None, skip_first: bool = False, use_cache: bool = True) -> Moment:
    """ROME's C = E[k kᵀ] of `spec.mlp_out`'s input at `layer` over the first n_tokens (None: all) corpus positions.

    Accumulates Σ k kᵀ in `dtype`; C is returned in float64. `meta["count"]` is the number
    of keys used (fewer than n_tokens when the corpus is shorter or skip_first drops position
    0). Cached under cache_dir()/stats/<model>/ with a JSON sidecar; a cache whose metadata
    differs from the request (incl. library version) is recomputed.
    """
    return second_moments(lm, [layer], n_tokens, corpus, dtype, batch_tokens, seq_len, skip_first, use_cache)[layer]


def second_moments(lm: LoadedModel, layers, n_tokens: int | None = DEFAULT_N_TOKENS, corpus: str = "wikitext",
                   dtype: torch.dtype = torch.float64, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                   seq_len: int | None = None, skip_first: bool = False, use_cache: bool = True) -> dict[int, Moment]:
    """`second_moment` of several layers {layer: Moment}: the ones not cached come from one shared pass
    over the corpus (MEMIT's and AlphaEdit's layer ranges cost one pass, not one per layer)."""
    memo: dict = {}
    requests = {L: _request(lm, L, n_tokens, corpus, dtype, seq_len, skip_first, memo) for L in dict.fromkeys(layers)}
    out = {L: hit for L, r in requests.items() if use_cache and (hit := _load(cache_path(r), r)) is not None}
    missing = {r["module"]: L for L, r in requests.items() if L not in out}
    if missing:
        seq = next(iter(requests.values()))["seq_len"]
        ids, lengths = take_tokens(*corpus_windows(lm, corpus, seq), n_tokens)
        with unedited(lm):
            sums = _accumulate(lm, list(missing), ids, lengths, batch_tokens, dtype, skip_first)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for module, L in missing.items():
            (S, count), = sums[module]
            out[L] = _moment(S, count, dict(requests[L], created=created))
            if use_cache:
                _save(cache_path(requests[L]), out[L])
    return out


def model_moments(lm: LoadedModel, layers, n_tokens: int | None = DEFAULT_N_TOKENS) -> dict[int, Moment]:
    """`second_moments` kept per live model object, so that every edit of an editor reuses C and its
    Cholesky factor. C is of the unedited model, so edits in between leave it as it is."""
    cache = _PER_MODEL.setdefault(lm.model, {})
    todo = [L for L in layers if (L, n_tokens) not in cache]
    if todo:
        cache.update({(L, n_tokens): m for L, m in second_moments(lm, todo, n_tokens).items()})
    return {L: cache[L, n_tokens] for L in layers}


def first_position_moment(lm: LoadedModel, layer: int, corpus: str = "wikitext", batch_size: int = 1024) -> Moment:
    """F = Σ_t p(t) k₁(t) k₁(t)ᵀ: the second moment of the key at a text's first content position (0, or 1
    after BOS) over the tokens t of the vocabulary, each weighted by its frequency p(t) in the corpus.

    The key there is a function of the token alone (the position sees only itself, and BOS), so F is exact over
    what every text's first position can hold, not sampled. Without BOS these keys share a large common
    direction with a first-token subject's k^u ("The Fall of ROME", Sec. 4): F is what an update must spare
    to leave the first position of every other text alone. Of the unedited model (`live.unedited`), kept per live
    model object as `model_moments` keeps C."""
    cache = _PER_MODEL.setdefault(lm.model, {})
    if ("first", layer, corpus) in cache:
        return cache["first", layer, corpus]
    tokens = _TOKENS.setdefault(lm.tok, {})
    if corpus not in tokens:
        corpus_windows(lm, corpus)
    counts = torch.bincount(torch.tensor(tokens[corpus]))
    ids = counts.nonzero().squeeze(1)
    weights = counts[ids].double() / counts.sum()
    bos = [lm.tok.bos_token_id] if lm.spec.prepend_bos else []
    S = None
    with unedited(lm):
        for i in range(0, len(ids), batch_size):
            x = torch.tensor([bos + [int(t)] for t in ids[i:i + batch_size]], device=lm.device)
            K, _, _ = read_keys(lm, [layer], [len(bos)] * len(x), dict(input_ids=x, attention_mask=torch.ones_like(x)))
            k = K[layer].double().cpu()
            part = (k * weights[i:i + batch_size, None]).T @ k
            S = part if S is None else S + part
    cache["first", layer, corpus] = Moment((S + S.T) / 2, dict(model=lm.spec.name, layer=layer, corpus=corpus,
                                                               first_position=True, count=len(ids), d_k=S.shape[0]))
    return cache["first", layer, corpus]


# ---------------------------------------------------------------- studies
def convergence(lm: LoadedModel, layer: int, sizes: list[int], keys: torch.Tensor, corpus: str = "wikitext",
                seq_len: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                skip_first: bool = False) -> pd.DataFrame:
    """How C_n (first n tokens) approaches C_all (whole corpus), in one pass over the corpus.

    One row per (n, key): n_tokens (keys actually used, rounded up to a batch), key,
    rel_fro_err = ‖C_n − C_all‖_F / ‖C_all‖_F, cos = cos(C_n⁻¹k, C_all⁻¹k), and the same two
    against C_rest, the moment of the other N − n tokens (disjoint from C_n, so free of the
    overlap that flatters the comparison with C_all): rel_fro_err_rest, cos_rest. NaN where a
    moment is singular. Only the direction of C⁻¹k enters ROME's update (Δ k' ∝ (C⁻¹k)ᵀk').
    """
    request = _request(lm, layer, None, corpus, torch.float64, seq_len, skip_first)
    ids, lengths = corpus_windows(lm, corpus, request["seq_len"])
    with unedited(lm):
        snaps = _accumulate(lm, [request["module"]], ids, lengths, batch_tokens, torch.float64, skip_first,
                            sizes)[request["module"]]
    S_all, N = snaps[-1]
    snaps = [s for s in snaps[:-1] if s[1] < N] + snaps[-1:]  # a mark reached only by the last batch: once
    full = _moment(S_all, N, request)
    keys = keys.double()

    def compare(m: Moment, ref: Moment | None) -> tuple[float, list[float]]:
        if ref is None:
            return float("nan"), [float("nan")] * len(keys)
        err = float(torch.linalg.matrix_norm(m.C - ref.C) / torch.linalg.matrix_norm(ref.C))
        try:
            return err, F.cosine_similarity(m.inv_apply(keys), ref.inv_apply(keys), dim=-1).tolist()
        except ValueError:
            return err, [float("nan")] * len(keys)

    rows = []
    for S, n in snaps:
        m = _moment(S, n, request)
        err, cos = compare(m, full)
        err_rest, cos_rest = compare(m, _moment(S_all - S, N - n, request) if n < N else None)
        rows += [dict(n_tokens=n, key=i, rel_fro_err=err, cos=c, rel_fro_err_rest=err_rest, cos_rest=cr)
                 for i, (c, cr) in enumerate(zip(cos, cos_rest))]
    return pd.DataFrame(rows)


def first_token_share(lm: LoadedModel, layers: list[int], n_tokens: int | None = 50_000,
                      corpus: str = "wikitext", seq_len: int | None = None,
                      batch_tokens: int = DEFAULT_BATCH_TOKENS) -> pd.DataFrame:
    """Share of trace(C) = E‖k‖² that comes from position 0 of the windows, per layer.

    Columns: layer, seq_len, key_share (position-0 keys / all keys), trace_share
    (Σ_pos0 ‖k‖² / Σ ‖k‖²), norm_ratio (mean ‖k‖ at position 0 / mean ‖k‖ elsewhere).
    """
    seq_len = resolve_seq_len(lm, seq_len)
    names = [lm.spec.module("mlp_out", L) for L in layers]
    ids, lengths = take_tokens(*corpus_windows(lm, corpus, seq_len), n_tokens)
    sums = torch.zeros(len(layers), 4, dtype=torch.float64)  # Σ‖k‖²: pos 0, all; Σ‖k‖: pos 0, rest
    for x, mask in _batches(lm, ids, lengths, batch_tokens, desc="first-token share"):
        with torch.no_grad(), TraceDict(lm.model, names, retain_input=True, stop=True) as td:
            lm.model(input_ids=x, attention_mask=mask.long())
        rest = mask.clone()
        rest[:, 0] = False
        for j, name in enumerate(names):
            norm = td[name].input.double().norm(dim=-1).cpu()
            sq = norm ** 2
            sums[j] += torch.stack([sq[:, 0].sum(), sq[mask.cpu()].sum(), norm[:, 0].sum(), norm[rest.cpu()].sum()])
    n_first, n_rest = len(lengths), int(lengths.sum()) - len(lengths)
    return pd.DataFrame(dict(layer=layers, seq_len=seq_len, key_share=n_first / (n_first + n_rest),
                             trace_share=(sums[:, 0] / sums[:, 1]).numpy(),
                             norm_ratio=((sums[:, 2] / n_first) / (sums[:, 3] / n_rest)).numpy()))
