"""MEND (Mitchell et al. 2022, "Fast model editing at scale"): a trained editor of gradients.

The fine-tuning loss of an edit, L = Σ_requests −1/T Σ_t log p(target_t | prompt, target_<t),
has at a linear weight W (input u, output z = W u) the gradient ∇_W L = Σ_i δ_i u_iᵀ over the
token positions i, with δ_i = ∂L/∂z_i: a sum of rank-1 outer products. MEND edits the MLP
weights of the last layers by mapping each factor pair through a small network g (Sec. 3):

    û = (u − μ_u)/σ_u,   δ̂ = (δ − μ_δ)/σ_δ          running statistics from training
    (ũ, δ̃) = g([û, δ̂]; mode)                        two low-rank residual layers,
                                                     h ← h + relu((U V h + b) ⊙ s_mode + o_mode)
    ΔW = −η_W Σ_i δ̃_i ũ_iᵀ                          η_W: a learned step per weight

One g is shared by all weights of the same shape; `mode` (the weight's index among them)
selects a learned scale and shift. U starts at zero, so an untrained g is the identity and the
edit a normalised gradient step. g and η are trained (Sec. 3.2) on edits drawn from the
zsRE and CounterFact training data: the edit is computed from the edit prompt, then
L_edit (NLL of the target after the edit prompt and after its rephrase, on the edited model)
and L_loc = KL(p(· | x_loc) before ‖ after) on the case's locality prompt and answer are
combined, c_edit·L_edit + c_loc·L_loc, and minimised by Adam through the edit.

    python -m editcollapse.editors.mend train --model smollm2-135m --steps 300
    python -m editcollapse.editors.mend evaluate --model smollm2-135m --cases 20

The checkpoint lives outside git, in cache_dir()/mend/<model>/ (mend.pt, meta.json,
curve.json); `MEND()` loads it and refuses, saying how to make it, when it is missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
import weakref
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..errors import EditError
from ..models.live import fingerprint
from ..models.loading import LoadedModel
from ..models.nethook import Trace, get_module
from ..paths import atomic_write_text, cache_dir
from .base import Editor, EditRequest, check_overrides, hparams_for, param_delta
from .ft import TargetBatch, scored_nll, target_batch, target_nll
from .vstar import _Cached, _logits, _standing_in, check_float, check_int

ARCHITECTURE = ("layers", "rank", "n_hidden")  # settings a checkpoint must share with the editor


@dataclass(frozen=True, kw_only=True)
class MENDHyperParams:
    """MEND's settings (the papers' hparams/TRAINING/MEND/*.yaml): the edited layers, g's shape, training."""

    layers: tuple  # the MLP weights of these layers are edited (MEND: the last 3)
    rank: int = 1920  # rank of U V in g's layers (capped at d_in + d_out)
    n_hidden: int = 1  # g has n_hidden + 1 residual layers
    edit_lr: float = 1e-4  # initial η per weight
    lr: float = 1e-6  # Adam's learning rate for g
    lr_lr: float = 1e-4  # Adam's learning rate for η
    c_edit: float = 0.1
    c_loc: float = 1.0
    batch_size: int = 1  # edits per training step
    grad_clip: float = 100.0
    train_steps: int = 100_000  # `make train-mend` (PROFILE=quick)
    train_steps_paper: int = 100_000  # `make train-mend PROFILE=paper`
    seed: int = 0

    def __post_init__(self):
        layers = self.layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or not layers or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) \
                or list(layers) != sorted(set(layers)):
            raise EditError(f"MENDHyperParams.layers must be a non-empty increasing list of distinct layer "
                            f"indices >= 0, got {layers!r}")
        object.__setattr__(self, "layers", tuple(layers))
        for name in ("rank", "batch_size", "train_steps", "train_steps_paper"):
            check_int(self, name, 1)
        check_int(self, "n_hidden", 0)
        check_int(self, "seed", 0)
        for name in ("edit_lr", "lr", "lr_lr", "c_edit", "c_loc", "grad_clip"):
            check_float(self, name, 0.0)


# The papers' settings (the authors' fork, hparams/TRAINING/MEND/*.yaml = MEND's own): the MLP weights
# of the last 3 layers, rank 1920, one hidden layer, η₀ = 1e-4, Adam 1e-6 (g) and 1e-4 (η), c_edit 0.1,
# c_loc 1, one edit per step, up to 100,000 steps. The local models (docs/mend.md): training in minutes
# on a CPU, so a smaller g (rank 256), Adam 1e-4 for g and 300 steps; c_loc 5, since CounterFact's
# locality prompts share the edit's relation (MEND's zsRE ones are unrelated NQ questions) and with
# c_loc 1 the edits spilled onto 90 % of them (locality 0.10 against 0.30).
_PAPER = dict(rank=1920, n_hidden=1, edit_lr=1e-4, lr=1e-6, lr_lr=1e-4, c_edit=0.1, c_loc=1.0, batch_size=1,
              train_steps=100_000, train_steps_paper=100_000)
_LOCAL = dict(_PAPER, rank=256, lr=1e-4, c_loc=5.0, train_steps=300, train_steps_paper=5_000)
_TINY = dict(_PAPER, rank=16, edit_lr=1e-3, lr=3e-3, lr_lr=3e-3, train_steps=40, train_steps_paper=400)
PRESETS = {
    "gpt2-xl": dict(_PAPER, layers=(45, 46, 47)),
    "gpt-j-6b": dict(_PAPER, layers=(25, 26, 27)),
    "llama2-7b": dict(_PAPER, layers=(29, 30, 31)),
    "smollm2-135m": dict(_LOCAL, layers=(27, 28, 29)),
    "gemma3-270m": dict(_LOCAL, layers=(15, 16, 17)),
    "tiny-gpt2": dict(_TINY, layers=(1, 2)),
    "tiny-gptj": dict(_TINY, layers=(1, 2)),
    "tiny-llama": dict(_TINY, layers=(1, 2)),
    "tiny-gemma3": dict(_TINY, layers=(1, 2)),
}


def mlp_weights(lm: LoadedModel, layers) -> list[str]:
    """The MLP's linear modules of these layers (Llama: gate, up, down; GPT-2: c_fc, c_proj), in order."""
    names = []
    for layer in layers:
        if not 0 <= layer < lm.n_layers:
            raise EditError(f"layer {layer} out of range for {lm.spec.name} ({lm.n_layers} layers)")
        mlp = lm.spec.module("mlp", layer)
        names += [f"{mlp}.{n}" for n, m in get_module(lm.model, mlp).named_children()
                  if isinstance(m, (nn.Linear, Conv1D))]
    return names


def in_out(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear module (GPT-2's Conv1D stores W as [d_in, d_out])."""
    if isinstance(module, Conv1D):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


# ---------------------------------------------------------------- the gradient transform g
class LowRankResidual(nn.Module):
    """h ↦ h + relu((U V h + b) ⊙ s_mode + o_mode); U = 0 at start (the identity)."""

    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        self.U = nn.Parameter(torch.zeros(dim, rank))
        self.V = nn.Parameter(torch.randn(rank, dim) / math.sqrt(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, h: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (h @ self.V.T @ self.U.T + self.b) * self.scale[mode] + self.shift[mode]
        return h + pre.clamp(min=0)  # clamp: its gradient at 0 is 1, so the zero start can move


class GradientTransform(nn.Module):
    """g for the weights of one shape [d_in → d_out]: normalisation statistics and residual layers."""

    def __init__(self, d_in: int, d_out: int, rank: int, n_hidden: int, n_modes: int):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes) for _ in range(n_hidden + 1))
        for name, d in (("u", d_in), ("delta", d_out)):  # Welford: count, mean, sum of squared deviations
            self.register_buffer(f"{name}_mean", torch.zeros(d, dtype=torch.float64))
            self.register_buffer(f"{name}_m2", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def observe(self, u: torch.Tensor, delta: torch.Tensor) -> None:
        """Add factor rows to the running mean and variance (Chan et al.'s parallel update)."""
        n = u.shape[0]
        total = self.count + n
        for name, x in (("u", u), ("delta", delta)):
            x = x.double()
            mean, m2 = getattr(self, f"{name}_mean"), getattr(self, f"{name}_m2")
            d = x.mean(0) - mean
            m2 += ((x - x.mean(0)) ** 2).sum(0) + d ** 2 * self.count * n / total
            mean += d * n / total
        self.count.fill_(total)

    def std(self, name: str) -> torch.Tensor:
        return (getattr(self, f"{name}_m2") / (self.count - 1).clamp(min=1)).sqrt().float()

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count < 2:
            raise EditError("MEND's normalisation has seen fewer than 2 factor rows; train it first")
        h = torch.cat([(u - self.u_mean.float()) / (self.std("u") + 1e-7),
                       (delta - self.delta_mean.float()) / (self.std("delta") + 1e-7)], dim=-1)
        for layer in self.layers:
            h = layer(h, mode)
        return h.split([self.d_in, self.d_out], dim=-1)


class MENDNet(nn.Module):
    """g per weight shape (shared, with one mode per weight) and η per weight."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, n_hidden: int, edit_lr: float):
        super().__init__()
        self.names = list(shapes)
        self.shapes = dict(shapes)
        groups: dict[tuple[int, int], list[str]] = {}
        for name, shape in shapes.items():
            groups.setdefault(tuple(shape), []).append(name)
        self.mode = {name: (shape, members.index(name)) for shape, members in groups.items() for name in members}
        self.g = nn.ModuleDict({f"{i}x{o}": GradientTransform(i, o, rank, n_hidden, len(m))
                                for (i, o), m in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(shapes),), float(edit_lr)))

    def transform(self, name: str, u: torch.Tensor, delta: torch.Tensor):
        (i, o), mode = self.mode[name]
        return self.g[f"{i}x{o}"](u, delta, mode)

    def observe(self, factors: dict) -> None:
        for name, (u, delta) in factors.items():
            (i, o), _ = self.mode[name]
            self.g[f"{i}x{o}"].observe(u, delta)

    def deltas(self, factors: dict) -> dict[str, torch.Tensor]:
        """ΔW = −η Σ_i δ̃_i ũ_iᵀ per weight, as [d_out, d_in]."""
        out = {}
        for k, name in enumerate(self.names):
            u, delta = factors[name]
            u_t, delta_t = self.transform(name, u, delta)
            out[name] = -self.edit_lrs[k] * delta_t.T @ u_t
        return out


# ---------------------------------------------------------------- factors and the edited forward
def run(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, probes: list[str] = (), deltas: dict | None = None,
        below: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Final hidden states [B, S, d] of the batch, and {module: (input u, probe)} for each of `probes`.

    A probe is a zero tensor added to the module's output, so that ∂L/∂probe = δ (the model's own
    weights need no gradient). `deltas` {module: ΔW [d_out, d_in]} add ΔW u to their modules'
    outputs (the edited model, with the graph reaching ΔW). `below` = (n, h): the first n decoder
    layers stand in with their output h, computed once (nothing below the edited layers changes).
    """
    seen = {}

    def probe(name):
        def hook(mod, inputs, output):
            p = torch.zeros_like(output, requires_grad=True)
            seen[name] = (inputs[0].detach(), p)
            return output + p
        return hook

    def add(delta):
        return lambda mod, inputs, output: output + inputs[0] @ delta.T.to(output.dtype)

    with ExitStack() as stack:
        for name in probes:
            stack.callback(get_module(lm.model, name).register_forward_hook(probe(name)).remove)
        for name, delta in (deltas or {}).items():
            stack.callback(get_module(lm.model, name).register_forward_hook(add(delta)).remove)
        if below is not None and below[0]:
            layers = get_module(lm.model, lm.spec.layer.removesuffix(".{}"))
            stack.enter_context(_standing_in(layers, [_Cached(below[1])] * below[0]))
        hidden = lm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden, seen


def hidden_below(lm: LoadedModel, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """(layer, output of decoder layer `layer` − 1) for `run(below=...)`; (0, None) for layer 0."""
    if layer == 0:
        return 0, None
    with torch.no_grad(), Trace(lm.model, lm.spec.module("layer", layer - 1), retain_output=True, stop=True) as t:
        lm.model.base_model(input_ids=ids, attention_mask=mask)
    return layer, t.output


def factors_of(seen: dict, nll: torch.Tensor, mask: torch.Tensor) -> dict:
    """{module: (u [N, d_in], δ [N, d_out])} over the real tokens (mask [B, S]) of rows whose loss is `nll`."""
    names = list(seen)
    with torch.enable_grad():
        grads = torch.autograd.grad(nll.sum(), [seen[n][1] for n in names], allow_unused=True)
    real = mask.bool()
    out = {}
    for name, g in zip(names, grads):
        u, p = seen[name]
        g = torch.zeros_like(p) if g is None else g
        out[name] = (u[real].float(), g[real].float())
    return out


def gradient_factors(lm: LoadedModel, modules: list[str], b: TargetBatch) -> tuple[dict, torch.Tensor]:
    """The factors (u, δ) of ∇W L at each module, L = Σ_requests mean NLL of the target; and the NLL per request."""
    with torch.enable_grad():
        hidden, seen = run(lm, b.ids, b.mask, probes=modules)
        nll = scored_nll(_logits(lm, hidden[b.rows, b.cols]), b)
    return factors_of(seen, nll, b.mask), nll.detach()


def _step(lm: LoadedModel, net: MENDNet, hp: MENDHyperParams, cases: list[dict], train: bool):
    """One training (or validation) edit of a batch of cases: (loss, scalars, ΔW per weight).

    One batch holds the edit rows (prompt ⊕ target), their rephrases and the locality rows; the
    layers below the first edited one run once; then the edited layers run twice, before the
    edit (for the factors and the locality reference) and after it (for the losses).
    """
    n = len(cases)
    loc_rows = [lm.token_ids(c["locality_prompt"]) + lm.tok(" " + c["locality_ground_truth"],
                                                            add_special_tokens=False)["input_ids"] for c in cases]
    b = target_batch(lm, [c["prompt"] for c in cases] + [c["rephrase_prompt"] for c in cases],
                     [c["target_new"] for c in cases] * 2, extra_rows=loc_rows)
    below = hidden_below(lm, min(hp.layers), b.ids, b.mask)
    loc_real = b.mask[2 * n:].bool()
    edit_mask = b.mask.clone()
    edit_mask[n:] = 0  # factors come from the edit rows only
    with torch.enable_grad():
        hidden, seen = run(lm, b.ids, b.mask, probes=net.names, below=below)
        nll_pre = scored_nll(_logits(lm, hidden[b.rows, b.cols]), b)
        factors = factors_of(seen, nll_pre[:n], edit_mask)
    loc_pre = torch.log_softmax(_logits(lm, hidden[2 * n:][loc_real].detach()), -1)
    if train:
        net.observe(factors)
    deltas = net.deltas(factors)
    hidden, _ = run(lm, b.ids, b.mask, deltas=deltas, below=below)
    nll_post = scored_nll(_logits(lm, hidden[b.rows, b.cols]), b)
    loc_post = torch.log_softmax(_logits(lm, hidden[2 * n:][loc_real]), -1)
    l_loc = (loc_pre.exp() * (loc_pre - loc_post)).sum(-1).mean()  # KL(before ‖ after) per locality token
    l_edit = nll_post.mean()
    loss = hp.c_edit * l_edit + hp.c_loc * l_loc
    return loss, dict(loss=loss.item(), l_edit=l_edit.item(), l_loc=l_loc.item(), nll_pre=nll_pre[:n].mean().item(),
                      nll_edit=nll_post[:n].mean().item(), nll_rephrase=nll_post[n:].mean().item(),
                      edit_lr=net.edit_lrs.mean().item()), deltas


# ---------------------------------------------------------------- checkpoints
@dataclass
class MENDCheckpoint:
    """A trained MEND: the network and its metadata (model, layers, weights, settings, training, version)."""

    net: MENDNet
    meta: dict
    curve: list = field(default_factory=list, repr=False)

    def save(self, folder: str | Path) -> Path:
        """Write mend.pt, meta.json and curve.json into `folder` (replaced whole, never half-written)."""
        folder = Path(folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"state": self.net.state_dict(), "meta": self.meta}, tmp / "mend.pt")
        atomic_write_text(tmp / "meta.json", json.dumps(self.meta, indent=1))
        atomic_write_text(tmp / "curve.json", json.dumps(self.curve))
        old = folder.with_name(f"{folder.name}.old{os.getpid()}")
        if folder.exists():
            folder.replace(old)  # the old checkpoint stays whole until the new one is in place
        tmp.replace(folder)
        if old.exists():
            shutil.rmtree(old)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "MENDCheckpoint":
        path = Path(folder) / "mend.pt"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            meta = blob["meta"]
            net = MENDNet({n: tuple(s) for n, s in meta["shapes"].items()}, meta["hparams"]["rank"],
                          meta["hparams"]["n_hidden"], meta["hparams"]["edit_lr"])
            net.load_state_dict(blob["state"])
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
            raise EditError(f"cannot load the MEND checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); "
                            f"make it again with `make train-mend MODEL=...`") from e
        curve_file = Path(folder) / "curve.json"
        return cls(net, meta, json.loads(curve_file.read_text()) if curve_file.exists() else [])

    def check(self, lm: LoadedModel, hp: MENDHyperParams) -> None:
        """Refuse a checkpoint made for another model, other layers or another network shape."""
        how = f"train one with `make train-mend MODEL={lm.spec.name}`"
        if self.meta.get("model") != lm.spec.name:
            raise EditError(f"this MEND checkpoint was trained for {self.meta.get('model')}, not {lm.spec.name}; {how}")
        for name in ARCHITECTURE:
            mine, theirs = getattr(hp, name), self.meta["hparams"].get(name)
            if (list(mine) if name == "layers" else mine) != theirs:
                raise EditError(f"this MEND checkpoint has {name}={theirs}, the editor's settings {name}={mine}; "
                                f"{how} (with these settings) or drop the override")
        shapes = {n: list(in_out(get_module(lm.model, n))) for n in mlp_weights(lm, hp.layers)}
        if shapes != self.meta["shapes"]:
            raise EditError(f"this MEND checkpoint's weights {self.meta['shapes']} do not match {lm.spec.name}'s "
                            f"{shapes}; {how}")


def _all_parameters(lm: LoadedModel) -> list[str]:
    """MEND's gradient factors depend on every weight: a checkpoint is for the whole model's weights."""
    return [name for name, _ in lm.model.named_parameters()]


def checkpoint_dir(model: str) -> Path:
    """Where `make train-mend MODEL=model` puts the checkpoint: cache_dir()/mend/<model>/."""
    return cache_dir() / "mend" / model


# ---------------------------------------------------------------- training
def training_cases() -> tuple[list[dict], str]:
    """MEND's training edits: CounterFact's train split and zsRE but its last 100 cases (kept for evaluation)."""
    from .. import data

    cf, zsre = data.load_counterfact("train"), [c for c in data.load_zsre() if c["case_id"] < 900]
    return cf + zsre, f"counterfact:train ({len(cf)}) + zsre:case_id<900 ({len(zsre)})"


@lru_cache(maxsize=1)
def training_ids() -> frozenset[tuple[str, int]]:
    """(dataset, case_id) of `training_cases()`, the edits a default checkpoint was trained on."""
    return frozenset((c["dataset"], int(c["case_id"])) for c in training_cases()[0])


def held_out_cases(n: int = 20, dataset: str = "counterfact", seed: int = 0) -> list[dict]:
    """Cases MEND never trains on: CounterFact's val split, zsRE's cases 900..999."""
    from .. import data

    if dataset == "counterfact":
        return data.load_counterfact("val", n=n, seed=seed)
    return [c for c in data.load_zsre() if c["case_id"] >= 900][:n]


def _usable(lm: LoadedModel, case: dict) -> bool:
    try:
        EditRequest.from_case(case).validate()
        return all(lm.token_ids(case[k]) for k in ("prompt", "rephrase_prompt", "locality_prompt"))
    except (EditError, KeyError, TypeError):
        return False


def train(lm: LoadedModel, hp: MENDHyperParams, steps: int | None = None, cases: list[dict] | None = None,
          data_note: str | None = None, val_cases: list[dict] | None = None, val_every: int = 50,
          progress: bool = True) -> MENDCheckpoint:
    """Train g and η on `cases` (default `training_cases()`) for `steps` (default hp.train_steps).

    Each step edits `hp.batch_size` random cases; `val_cases` are edited every `val_every` steps
    without training (rows with "val_" keys in the curve). Returns the checkpoint (not saved).
    """
    steps = hp.train_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise EditError(f"MEND training needs steps >= 1, got {steps!r}")
    if cases is None:
        cases, data_note = training_cases()
    cases = [c for c in cases if _usable(lm, c)]
    if len(cases) < 2:
        raise EditError(f"MEND needs at least 2 usable training cases, got {len(cases)}")
    modules = mlp_weights(lm, hp.layers)
    torch.manual_seed(hp.seed)
    rng = random.Random(hp.seed)
    net = MENDNet({m: in_out(get_module(lm.model, m)) for m in modules}, hp.rank, hp.n_hidden, hp.edit_lr)
    net.to(lm.device)
    for c in rng.sample(cases, min(len(cases), 8)):  # seed the normalisation statistics
        net.observe(gradient_factors(lm, modules, target_batch(lm, [c["prompt"]], [c["target_new"]]))[0])
    g_params = [p for n, p in net.named_parameters() if n != "edit_lrs"]
    opt = torch.optim.Adam([dict(params=g_params, lr=hp.lr), dict(params=[net.edit_lrs], lr=hp.lr_lr)])
    curve, t0 = [], time.perf_counter()
    for step in tqdm(range(steps), desc=f"MEND training on {lm.spec.name}", disable=not progress):
        if val_cases and (step % val_every == 0):
            curve.append(dict(step=step, **validate(lm, net, hp, val_cases)))
        batch = [cases[rng.randrange(len(cases))] for _ in range(hp.batch_size)]
        with torch.enable_grad():
            loss, row, _ = _step(lm, net, hp, batch, train=True)
            if not torch.isfinite(loss):
                raise EditError(f"non-finite MEND training loss at step {step}: {row}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), hp.grad_clip)
            opt.step()
        curve.append(dict(step=step, seconds=time.perf_counter() - t0, **row))
    if val_cases:
        curve.append(dict(step=steps, **validate(lm, net, hp, val_cases)))
    train_rows = [r for r in curve if "loss" in r]
    tail = train_rows[-max(1, len(train_rows) // 10):]
    meta = dict(model=lm.spec.name, fingerprint=fingerprint(lm, _all_parameters(lm)), layers=list(hp.layers),
                weights=modules,
                shapes={m: list(s) for m, s in net.shapes.items()}, hparams=asdict(hp) | dict(layers=list(hp.layers)),
                steps=steps, data=data_note or f"{len(cases)} given cases", n_cases=len(cases),
                final=dict(loss=_mean(tail, "loss"), l_edit=_mean(tail, "l_edit"), l_loc=_mean(tail, "l_loc")),
                edit_lrs=net.edit_lrs.tolist(), seconds=time.perf_counter() - t0,
                library=f"editcollapse {version('editcollapse')}", torch=str(torch.__version__),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return MENDCheckpoint(net, meta, curve)


def validate(lm: LoadedModel, net: MENDNet, hp: MENDHyperParams, cases: list[dict]) -> dict:
    """Mean post-edit NLL and edit success (p(new) > p(true) after the edit prompt) over held-out cases."""
    rows, success = [], []
    for c in cases:
        with torch.no_grad():
            _, row, deltas = _step(lm, net, hp, [c], train=False)
            b = target_batch(lm, [c["prompt"]] * 2, [c["target_new"], c["ground_truth"]])
            nll = scored_nll(_logits(lm, run(lm, b.ids, b.mask, deltas=deltas)[0][b.rows, b.cols]), b)
        rows.append(row)
        success.append(float(nll[0] < nll[1]))
    return dict(val_l_edit=_mean(rows, "l_edit"), val_l_loc=_mean(rows, "l_loc"),
                val_nll_pre=_mean(rows, "nll_pre"), val_nll_edit=_mean(rows, "nll_edit"),
                val_success=sum(success) / len(success))


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


# ---------------------------------------------------------------- the editor
@dataclass
class MEND(Editor):
    """MEND with a trained checkpoint.

    `checkpoint`: None (cache_dir()/mend/<model>/, made by `make train-mend MODEL=...`), a folder
    holding mend.pt or holding <model>/mend.pt, a MENDCheckpoint, or a mapping model name →
    either. `hparams` overrides the model's preset (PRESETS); layers, rank and n_hidden must
    match the checkpoint's.
    """

    hparams: dict = field(default_factory=dict)
    checkpoint: object = None
    name = "mend"
    batched = True

    def __post_init__(self):
        check_overrides(MENDHyperParams, PRESETS, self.hparams)
        self._loaded: "weakref.WeakKeyDictionary[nn.Module, MENDCheckpoint]" = weakref.WeakKeyDictionary()

    def hparams_for(self, lm: LoadedModel) -> MENDHyperParams:
        return hparams_for(MENDHyperParams, PRESETS, lm, self.hparams)

    def trained_on(self, lm: LoadedModel, case: dict) -> bool:
        """Whether `case` is one of the default training edits (CounterFact train, zsRE < 900)."""
        return (case.get("dataset"), case.get("case_id")) in training_ids()

    def checkpoint_for(self, lm: LoadedModel) -> MENDCheckpoint:
        """The checkpoint for this live model, loaded once per model object and checked against its unedited
        weights once (a checkpoint that records the weights it was trained on must match them)."""
        model = lm.spec.name
        if lm.model not in self._loaded:
            source = self.checkpoint.get(model) if isinstance(self.checkpoint, Mapping) else self.checkpoint
            if isinstance(source, MENDCheckpoint):
                ckpt = source
            else:
                folder = Path(source) if source is not None else checkpoint_dir(model)
                if not (folder / "mend.pt").exists() and (folder / model / "mend.pt").exists():
                    folder = folder / model
                if not (folder / "mend.pt").exists():
                    raise EditError(f"no trained MEND checkpoint for {model} at {folder}: MEND must be trained first; "
                                    f"run `make train-mend MODEL={model}` (or `python -m editcollapse.editors.mend "
                                    f"train --model {model} --steps N`), or pass checkpoint=<folder>")
                ckpt = MENDCheckpoint.load(folder)
            trained_on = ckpt.meta.get("fingerprint")  # (one for another model is refused by `check`, by name)
            if trained_on is not None and ckpt.meta.get("model") == model \
                    and trained_on != fingerprint(lm, _all_parameters(lm)):
                raise EditError(f"this MEND checkpoint was trained on other weights of {model} (fingerprint "
                                f"{trained_on}); train one for these with `make train-mend MODEL={model}`")
            self._loaded[lm.model] = ckpt
        return self._loaded[lm.model]

    def _edit(self, lm: LoadedModel, requests: tuple[EditRequest, ...], tx):
        hp = self.hparams_for(lm)
        with self.timed("load"):
            ckpt = self.checkpoint_for(lm)
            ckpt.check(lm, hp)
            net = ckpt.net.to(lm.device)
        with self.timed("factors"):
            prompts = [r.template().format(r.subject) for r in requests]
            b = target_batch(lm, prompts, [r.target_new for r in requests])
            factors, nll_pre = gradient_factors(lm, net.names, b)
        with self.timed("update"), torch.no_grad():
            deltas = net.deltas(factors)
            if not all(torch.isfinite(d).all() for d in deltas.values()):
                raise EditError("non-finite MEND update")
            # how far g turned the update from a plain gradient step: cos(ΔW, −∇W L), over all weights
            grad = torch.cat([(delta.T @ u).flatten() for u, delta in factors.values()])
            cos = F.cosine_similarity(torch.cat([d.flatten() for d in deltas.values()]), -grad, dim=0).item()
            for module, delta in deltas.items():
                tx.add_(*param_delta(lm, module, delta))
        with self.timed("post"), torch.no_grad():
            nll_post = target_nll(lm.model(input_ids=b.ids, attention_mask=b.mask).logits, b)
        diagnostics = dict(
            layers=",".join(map(str, hp.layers)), mend_nll_pre=nll_pre.mean().item(),
            mend_nll_post=nll_post.mean().item(), mend_p_target=torch.exp(-nll_post).mean().item(),
            mend_grad_cosine=cos, mend_n_factors=int(b.mask.sum()), checkpoint_steps=ckpt.meta["steps"],
            checkpoint_created=ckpt.meta["created"], edit_lrs=net.edit_lrs.tolist(), hparams=asdict(hp))
        return diagnostics, None


# ---------------------------------------------------------------- command line
def curve_table(curve: list[dict], rows: int = 12) -> str:
    """The training curve as a text table: means over equal windows of steps, and the validation rows."""
    train_rows = [r for r in curve if "loss" in r]
    if not train_rows:
        return "(no training steps)"
    size = max(1, math.ceil(len(train_rows) / rows))
    lines = [f"{'steps':>11} {'loss':>8} {'L_edit':>8} {'L_loc':>8} {'nll pre':>8} {'nll edit':>8} "
             f"{'nll reph':>8} {'eta':>9}"]
    for i in range(0, len(train_rows), size):
        w = train_rows[i:i + size]
        lines.append(f"{w[0]['step']:>5}-{w[-1]['step']:<5} " + " ".join(
            f"{_mean(w, k):8.3f}" for k in ("loss", "l_edit", "l_loc", "nll_pre", "nll_edit", "nll_rephrase"))
                     + f" {_mean(w, 'edit_lr'):9.2e}")
    val = [r for r in curve if "val_success" in r]
    if val:
        lines.append(f"{'validation':>11} {'L_edit':>8} {'L_loc':>8} {'nll pre':>8} {'nll edit':>8} {'success':>8}")
        lines += [f"{'step ' + str(r['step']):>11} {r['val_l_edit']:8.3f} {r['val_l_loc']:8.4f} "
                  f"{r['val_nll_pre']:8.3f} "
                  f"{r['val_nll_edit']:8.3f} {r['val_success']:8.2f}" for r in val]
    return "\n".join(lines)


def evaluate(lm: LoadedModel, editor: MEND | Editor, cases: list[dict], ppl_size: int = 50) -> dict:
    """Efficacy, generalisation, locality per held-out case (edit, measure, undo); ME-PPL after the first edit."""
    from ..eval.metrics import edit_metrics, locality_reference
    from ..eval.perplexity import me_ppl

    rows = []
    for i, case in enumerate(tqdm(cases, desc=f"{editor.name} on held-out cases")):
        reference = locality_reference(lm, case)
        result = editor.apply(lm, EditRequest.from_case(case))
        try:
            row = dict(case_id=case["case_id"], **edit_metrics(lm, case, reference), seconds=result.seconds["total"],
                       delta_norm=result.diagnostics["delta_norm"])
            if i == 0:
                row["ppl"] = me_ppl(lm, ppl_size, progress=False)["mean"]
        finally:
            result.undo()
        rows.append(row)
    keys = ("efficacy", "generalization", "locality", "efficacy_acc", "generalization_acc", "locality_acc",
            "p_new", "seconds", "delta_norm")
    return dict(n=len(rows), **{k: sum(r[k] for r in rows) / len(rows) for k in keys},
                ppl_after_one_edit=rows[0]["ppl"], ppl_case=rows[0]["case_id"],
                ppl_original=me_ppl(lm, ppl_size, progress=False)["mean"], rows=rows)


def train_and_save(lm: LoadedModel, profile: str = "quick", steps: int | None = None, overrides: dict | None = None,
                   n_val: int = 8, val_every: int = 50, out: str | Path | None = None) -> tuple[MENDCheckpoint, Path]:
    """What `make train-mend` does: train with the preset's steps for `profile` (train_steps, or train_steps_paper
    in the paper profile) unless `steps` is given, validating on `n_val` held-out CounterFact cases every
    `val_every` steps, and save to `out` (default checkpoint_dir(model)). Returns (checkpoint, folder)."""
    hp = MEND(hparams=overrides or {}).hparams_for(lm)
    steps = steps or (hp.train_steps_paper if profile == "paper" else hp.train_steps)
    ckpt = train(lm, hp, steps, val_cases=held_out_cases(n_val) if n_val else None, val_every=val_every)
    return ckpt, ckpt.save(out or checkpoint_dir(lm.spec.name))


def main(argv=None) -> None:
    from ..models.loading import load_model

    ap = argparse.ArgumentParser(prog="python -m editcollapse.editors.mend", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train MEND on a model; save it under cache_dir()/mend/<model>/")
    t.add_argument("--model", default="smollm2-135m")
    t.add_argument("--steps", type=int, default=None,
                   help="default: the preset's train_steps (PROFILE=paper: train_steps_paper)")
    t.add_argument("--profile", choices=("quick", "paper"), default="quick")
    t.add_argument("--out", default=None, help="folder (default cache_dir()/mend/<model>)")
    t.add_argument("--val", type=int, default=8, help="held-out CounterFact cases validated every --val-every steps")
    t.add_argument("--val-every", type=int, default=50)
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset settings (JSON values)")
    e = sub.add_parser("evaluate", help="edit held-out CounterFact cases with the saved checkpoint")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--cases", type=int, default=20)
    e.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact")
    e.add_argument("--checkpoint", default=None)
    for p in (t, e):
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    if args.command == "train":
        overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
        ckpt, folder = train_and_save(lm, args.profile, args.steps, overrides, args.val, args.val_every, args.out)
        print(curve_table(ckpt.curve))
        print(f"saved {folder} ({ckpt.meta['seconds']:.0f} s, {ckpt.meta['seconds'] / ckpt.meta['steps']:.2f} s/step; "
              f"edit lrs {[f'{x:.2e}' for x in ckpt.meta['edit_lrs']]})")
    else:
        editor = MEND(checkpoint=args.checkpoint)
        res = evaluate(lm, editor, held_out_cases(args.cases, args.dataset))
        folder = Path(args.checkpoint) if args.checkpoint else checkpoint_dir(args.model)
        atomic_write_text(folder / f"eval_{args.dataset}.json", json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
