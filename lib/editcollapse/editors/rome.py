"""ROME (Meng et al. 2022) and the variants of "The Fall of ROME" (Yang et al. 2024).

One MLP output projection W of layer l is updated by a rank-one matrix

    Δ = (v* − W k) uᵀ / (uᵀ k),      u = C⁻¹ k̄  (or k̄ when mom2_adjustment is off)

- k^u : the key (input of W) at the subject's last token of the bare prompt;
- k̄  : the mean key over the prompt behind N random context prefixes (and the bare prompt);
- v*  : the MLP output that makes the model say the new target, found by gradient steps on
        δ in v* = W k^u + δ with a KL term and a norm penalty (ROME's compute_v).

ROME uses k = k^u in the numerator and the denominator: its keys are *inconsistent*, and
when k^u is far from k̄ (a subject that is the first token of the prompt) the denominator
(C⁻¹k̄)ᵀk^u is tiny, Δ huge and the model collapses. C-ROME uses k = k̄ everywhere. C-ROME
with a test-time prefix evaluates the edited model with a random prefix before each prompt,
so that test keys look like the edit's k̄ again.

The v* optimisation only changes what happens at and after the subject's last token from
layer l upwards. `fast=True` (default) therefore runs every prompt's tokens before that
token once, keeps their attention cache, and at each step runs only the remaining tokens,
scoring only the positions the loss needs; `fast=False` is the papers' way (the whole batch
through the whole model at each step, full-vocabulary log-softmax at every position).
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from ..metrics import target_ids
from ..models import LoadedModel, pad_ids
from ..nethook import Trace, get_module
from .base import EditError, EditRequest, EditResult, save_parameters


@dataclass(frozen=True)
class ROMEHyperParams:
    """The papers' ROME settings (their hparams/ROME/*.yaml); `ROMEHyperParams.for_model(lm)`."""

    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    mom2_adjustment: bool = False
    context_template_length_params: tuple = ((5, 10), (10, 10))
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    seed: int = 0  # context templates are sampled with this seed (the papers' code draws them unseeded)
    mom2_n_tokens: int | None = None  # None: stats.second_moment's default

    @classmethod
    def for_model(cls, lm: LoadedModel, **overrides) -> "ROMEHyperParams":
        params = dict(lm.spec.hparams.get("rome", {}))
        params.update(overrides)
        if "context_template_length_params" in params:
            params["context_template_length_params"] = tuple(map(tuple, params["context_template_length_params"]))
        return cls(**params)


# ---------------------------------------------------------------- context templates
_TEMPLATE_CACHE: dict = {}


def context_templates(lm: LoadedModel, length_params=((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """["{}"] + model-generated prefixes "<text>. {}" (ROME: top-5 sampling from five starters).

    `length_params` lists (length in tokens, count); sampling is seeded, so templates repeat.
    """
    key = (lm.spec.name, tuple(map(tuple, length_params)), seed)
    if key not in _TEMPLATE_CACHE:
        starters = ["The", "Therefore", "Because", "I", "You"]
        out = ["{}"]
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for length, n in length_params:
                for s in starters:
                    ids = torch.tensor([lm.token_ids(s)], device=lm.device)
                    gen = _generate(lm, ids, max_length=length + int(lm.spec.prepend_bos),
                                    num_return_sequences=n // len(starters))
                    for row in gen:
                        text = lm.tok.decode(row, skip_special_tokens=True)
                        out.append(text.replace("{", " ").replace("}", " ") + ". {}")
        _TEMPLATE_CACHE[key] = out
    return list(_TEMPLATE_CACHE[key])


def _generate(lm: LoadedModel, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    try:
        return lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                 pad_token_id=lm.tok.pad_token_id, **kwargs)
    except RuntimeError as e:  # e.g. "probability tensor contains either inf, nan or element < 0"
        raise EditError(f"sampling context templates failed; the model's outputs are not finite? ({e})") from e


# ---------------------------------------------------------------- token positions
def subject_last_index(lm: LoadedModel, template: str, subject: str) -> int:
    """Index of the subject's last token in `template.format(subject)` (BOS counted)."""
    prefix = template[: template.index("{}")]
    upto = lm.token_ids(prefix + subject)
    full = lm.token_ids(template.format(subject))
    if full[: len(upto)] != upto:
        raise EditError(f"subject {subject!r} tokenizes differently inside {template.format(subject)!r}")
    return len(upto) - 1


# ---------------------------------------------------------------- keys and values
def keys_and_values(lm: LoadedModel, layer: int, texts: list[str], idxs: list[int]):
    """Input k and output W k of the layer's MLP output projection at one position per text."""
    batch = lm.encode(texts)
    with torch.no_grad(), Trace(lm.model, lm.spec.module("mlp_out", layer), retain_input=True,
                                retain_output=True, stop=True) as t:
        lm.model(**batch)
    rows = torch.arange(len(texts), device=lm.device)
    idx = torch.tensor(idxs, device=lm.device)
    return t.input[rows, idx].float(), t.output[rows, idx].float()


# ---------------------------------------------------------------- v* (ROME's compute_v)
@dataclass
class _Prompts:
    """The batch of the v* objective: rewriting prompts (context + prompt + target[:-1]) and the KL prompt."""

    ids: list[list[int]]
    lookup: list[int]  # subject's last token per row
    target_pos: list[list[int]]  # positions whose next token is a target token (rewriting rows)
    target_ids: list[int]
    n_rewrite: int


def _build_prompts(lm: LoadedModel, request: EditRequest, templates: list[str], hp: ROMEHyperParams) -> _Prompts:
    tmpl = request.template()
    target = target_ids(lm, request.target_new)  # ' target', as ROME scores it (validate() refused empty ones)
    ids, lookup, target_pos = [], [], []
    for ctx in templates:
        t = ctx.format(tmpl)
        lookup.append(subject_last_index(lm, t, request.subject))
        row = lm.token_ids(t.format(request.subject)) + target[:-1]
        n = len(row)
        target_pos.append(list(range(n - len(target), n)))
        ids.append(row)
    kl = hp.kl_prompt
    lookup.append(subject_last_index(lm, kl, request.subject))
    ids.append(lm.token_ids(kl.format(request.subject)))
    return _Prompts(ids, lookup, target_pos, target, len(templates))


def _logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    logits = lm.model.get_output_embeddings()(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class _FullForward:
    """The papers' way: every step runs all prompts through the whole model."""

    def __init__(self, lm: LoadedModel, p: _Prompts, layer: int):
        self.lm, self.p, self.layer = lm, p, layer
        self.ids, self.mask = pad_ids(p.ids, lm.tok.pad_token_id, left=False, device=lm.device)
        self.rows = torch.arange(len(p.ids), device=lm.device)
        self.lookup = torch.tensor(p.lookup, device=lm.device)

    def __call__(self, delta: torch.Tensor):
        """(log p of each target token per rewriting row [n_rewrite, T], KL log-probs [1, V], v at lookup)."""
        seen = {}

        def add_delta(out):
            seen["v"] = out[self.rows, self.lookup].detach()
            out = out.clone()
            out[self.rows, self.lookup] += delta.to(out.dtype)
            return out

        with Trace(self.lm.model, self.lm.spec.module("mlp", self.layer), edit_output=add_delta):
            logits = self.lm.model(input_ids=self.ids, attention_mask=self.mask).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        p = self.p
        tgt = torch.stack([logp[i, p.target_pos[i], p.target_ids] for i in range(p.n_rewrite)])
        kl = logp[p.n_rewrite:][torch.arange(len(p.ids) - p.n_rewrite), self.lookup[p.n_rewrite:]]
        return tgt, kl, seen["v"]


class _CachedForward:
    """Run each prompt's tokens before the subject's last token once; each step runs only the rest.

    Rows are split at their lookup index: the prefixes are left-padded so that every
    lookup token sits in column 0 of the suffix batch, which is right-padded.
    """

    def __init__(self, lm: LoadedModel, p: _Prompts, layer: int):
        self.lm, self.p, self.layer = lm, p, layer
        dev, pad = lm.device, lm.tok.pad_token_id
        pre = [r[:i] for r, i in zip(p.ids, p.lookup)]
        suf = [r[i:] for r, i in zip(p.ids, p.lookup)]
        self.n_pre = max(len(r) for r in pre)
        s_ids, s_mask = pad_ids(suf, pad, left=False, device=dev)
        self.s_ids = s_ids
        pre_len = torch.tensor([len(r) for r in pre], device=dev)
        self.pos = pre_len[:, None] + torch.arange(s_ids.shape[1], device=dev)[None]
        self.cache = None
        if self.n_pre:
            p_ids, p_mask = pad_ids(pre, pad, left=True, device=dev)
            p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
            with torch.no_grad():
                out = lm.model.base_model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
            self.cache = out.cache
            self.mask = torch.cat([p_mask, s_mask], dim=1)
        else:
            self.mask = s_mask
        # rewriting rows: suffix position j predicts the token at j + 1
        self.t_rows = torch.tensor([i for i in range(p.n_rewrite) for _ in p.target_pos[i]], device=dev)
        self.t_cols = torch.tensor([q - p.lookup[i] for i in range(p.n_rewrite) for q in p.target_pos[i]], device=dev)
        self.t_ids = torch.tensor(p.target_ids * p.n_rewrite, device=dev)

    def __call__(self, delta: torch.Tensor):
        seen = {}

        def add_delta(out):
            seen["v"] = out[:, 0].detach()
            out = out.clone()
            out[:, 0] += delta.to(out.dtype)
            return out

        kwargs = dict(input_ids=self.s_ids, attention_mask=self.mask, position_ids=self.pos)
        if self.cache is not None:
            kwargs.update(cache=copy.deepcopy(self.cache), use_cache=True)
        with Trace(self.lm.model, self.lm.spec.module("mlp", self.layer), edit_output=add_delta):
            hidden = self.lm.model.base_model(**kwargs).last_hidden_state
        p = self.p
        logp_t = torch.log_softmax(_logits(self.lm, hidden[self.t_rows, self.t_cols]), dim=-1)
        tgt = logp_t[torch.arange(len(self.t_ids)), self.t_ids].view(p.n_rewrite, len(p.target_ids))
        kl = torch.log_softmax(_logits(self.lm, hidden[p.n_rewrite:, 0]), dim=-1)
        return tgt, kl, seen["v"]


def compute_v_star(lm: LoadedModel, request: EditRequest, templates: list[str], hp: ROMEHyperParams,
                   fast: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """v* = v_init + δ minimising  −log p(target | context ⊕ prompt)  + kl_factor·KL  + wd·‖δ‖/‖v_init‖².

    Returns (v*, v_init, loss curve). δ is clamped to ‖δ‖ ≤ clamp_norm_factor·‖v_init‖ (ROME).
    """
    p = _build_prompts(lm, request, templates, hp)
    forward = (_CachedForward if fast else _FullForward)(lm, p, hp.layer)
    delta = torch.zeros(lm.model.config.hidden_size, device=lm.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    kl_init, v_init, curve = None, None, []
    for step in range(hp.v_num_grad_steps):
        opt.zero_grad()
        tgt, kl_logp, v = forward(delta)
        if kl_init is None:
            kl_init, v_init = kl_logp.detach(), v[0].float()
        nll = -tgt.sum(1) / len(p.target_ids)
        nll_loss = nll.mean()
        kl_loss = hp.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        wd = hp.v_weight_decay * delta.norm() / v_init.norm() ** 2
        loss = nll_loss + kl_loss + wd
        if not torch.isfinite(loss):
            raise EditError(f"non-finite v* loss at step {step} (nll {nll_loss.item()}, kl {kl_loss.item()})")
        curve.append(dict(step=step, loss=loss.item(), nll=nll_loss.item(), kl=kl_loss.item(), wd=wd.item(),
                          p_target=torch.exp(-nll).mean().item()))
        if loss.item() < hp.early_stop_loss or step == hp.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = hp.clamp_norm_factor * v_init.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return (v_init + delta).detach(), v_init, curve


# ---------------------------------------------------------------- the editor
@dataclass
class ROME:
    """ROME (`consistent=False`) or C-ROME (`consistent=True`); `test_prefix=True` adds Sec. 5's prefix.

    `hparams` overrides the model's defaults (ROMEHyperParams.for_model), e.g. {"layer": 3}.
    """

    consistent: bool = False
    test_prefix: bool = False
    fast: bool = True
    hparams: dict = field(default_factory=dict)
    stats: object | None = None  # a stats.Moment for mom2_adjustment; computed on demand if None

    @property
    def name(self) -> str:
        return ("c-rome" if self.consistent else "rome") + ("-prefix" if self.test_prefix else "")

    def apply(self, lm: LoadedModel, request: EditRequest) -> EditResult:
        request.validate()
        hp = ROMEHyperParams.for_model(lm, **self.hparams)
        if not 0 <= hp.layer < lm.n_layers:
            raise EditError(f"layer {hp.layer} out of range for {lm.spec.name} ({lm.n_layers} layers)")
        clock = {}
        t0 = time.perf_counter()
        templates = context_templates(lm, hp.context_template_length_params, hp.seed)  # sampled once per model
        clock["templates"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        tmpl = request.template()
        texts = [c.format(tmpl).format(request.subject) for c in templates]
        idxs = [subject_last_index(lm, c.format(tmpl), request.subject) for c in templates]
        K, V = keys_and_values(lm, hp.layer, texts, idxs)
        k_u, k_bar = K[0], K.mean(0)
        C_inv_k = self._moment(lm, hp).inv_apply(k_bar) if hp.mom2_adjustment else k_bar
        clock["keys"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        v_star, v_init, curve = compute_v_star(lm, request, templates, hp, fast=self.fast)
        clock["v_star"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        k, Wk = (k_bar, V.mean(0)) if self.consistent else (k_u, V[0])
        u = C_inv_k.float()
        denominator_raw = torch.dot(u, k)
        residual = v_star - Wk  # numerator's vector v* − W k
        delta = torch.outer(residual, u) / denominator_raw  # [d_out, d_in]
        if not torch.isfinite(delta).all():
            raise EditError(f"non-finite update (denominator {denominator_raw.item():.3g})")
        name = lm.spec.module("mlp_out", hp.layer) + ".weight"
        saved = save_parameters(lm, [name])
        module = get_module(lm.model, lm.spec.module("mlp_out", hp.layer))
        with torch.no_grad():  # GPT-2's Conv1D stores W as [d_in, d_out]
            module.weight.add_((delta.T if isinstance(module, Conv1D) else delta).to(module.weight.dtype))
        clock["update"] = time.perf_counter() - t0

        diagnostics = dict(
            layer=hp.layer, k_u=k_u.cpu(), k_bar=k_bar.cpu(), C_inv_k=C_inv_k.float().cpu(), v_star=v_star.cpu(),
            v_init=v_init.cpu(), numerator=residual.cpu(), numerator_norm=residual.norm().item(),
            # the papers' code reports the denominator with u normalised: (u/‖u‖)ᵀ k
            denominator=(denominator_raw / u.norm()).item(), denominator_raw=denominator_raw.item(),
            delta_norm=delta.norm().item(), k_u_k_bar_cosine=F.cosine_similarity(k_u, k_bar, dim=0).item(),
            loss_curve=curve, context_templates=templates, hparams=asdict(hp))
        prefix = None
        if self.test_prefix:
            prefix = self.prefix_for(lm, hp, request)
        return EditResult(request, self.name, saved, lm, diagnostics, clock, test_prefix=prefix)

    @staticmethod
    def prefix_for(lm: LoadedModel, hp: ROMEHyperParams, request: EditRequest) -> str:
        """A test-time prefix: one of the edit's own context templates (seeded by the case id)."""
        prefixes = context_templates(lm, hp.context_template_length_params, hp.seed)[1:]
        pick = (request.case_id or 0) % len(prefixes)
        return prefixes[pick].replace("{}", "")

    def _moment(self, lm: LoadedModel, hp: ROMEHyperParams):
        if self.stats is None:
            from ..stats import second_moment

            kwargs = {} if hp.mom2_n_tokens is None else {"n_tokens": hp.mom2_n_tokens}
            self.stats = second_moment(lm, hp.layer, **kwargs)
        return self.stats

