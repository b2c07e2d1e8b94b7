"""The MEND editor (Mitchell et al. 2022, Sec. 3): its settings, its trained checkpoint and its data splits.

An edit computes the factors (u, δ) of the fine-tuning loss's gradient at the MLP weights of the
last layers, L = Σ_requests −1/T Σ_t log p(target_t | prompt, target_<t), maps them through the
trained g and adds ΔW = −η_W Σ_i δ̃_i ũ_iᵀ (`network`). The checkpoint (g and η, made by
`training.train`) lives outside git, in cache_dir()/mend/<model>/ (mend.pt, meta.json, curve.json);
`MEND()` loads it and refuses, saying how to make it, when it is missing.
"""
from __future__ import annotations

import json
import os
import shutil
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import EditError
from ...eval.scoring import mean_nll, pack, target_pairs
from ...models.live import fingerprint
from ...models.loading import LoadedModel
from ...models.nethook import get_module
from ...paths import atomic_write_text, cache_dir
from ..base import Editor, EditRequest, HyperParams, layer_list, param_delta, setting
from .network import MENDNet, gradient_factors, in_out, mlp_weights

ARCHITECTURE = ("layers", "rank", "n_hidden")  # settings a checkpoint must share with the editor


@dataclass(frozen=True, kw_only=True)
class MENDHyperParams(HyperParams):
    """MEND's settings (the papers' hparams/TRAINING/MEND/*.yaml): the edited layers, g's shape, training."""

    layers: tuple = setting(tuple, convert=layer_list)  # the MLP weights of these layers are edited (MEND: the last 3)
    rank: int = setting(int, 1920, at_least=1)  # rank of U V in g's layers (capped at d_in + d_out)
    n_hidden: int = setting(int, 1, at_least=0)  # g has n_hidden + 1 residual layers
    edit_lr: float = setting(float, 1e-4, at_least=0)  # initial η per weight
    lr: float = setting(float, 1e-6, at_least=0)  # Adam's learning rate for g
    lr_lr: float = setting(float, 1e-4, at_least=0)  # Adam's learning rate for η
    c_edit: float = setting(float, 0.1, at_least=0)
    c_loc: float = setting(float, 1.0, at_least=0)
    batch_size: int = setting(int, 1, at_least=1)  # edits per training step
    grad_clip: float = setting(float, 100.0, at_least=0)
    train_steps: int = setting(int, 100_000, at_least=1)  # `make train-mend` (PROFILE=quick)
    train_steps_paper: int = setting(int, 100_000, at_least=1)  # `make train-mend PROFILE=paper`
    seed: int = setting(int, 0, at_least=0)


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


def all_weights(lm: LoadedModel) -> list[str]:
    """MEND's gradient factors depend on every weight: a checkpoint is for the whole model's weights."""
    return [name for name, _ in lm.model.named_parameters()]


def checkpoint_dir(model: str) -> Path:
    """Where `make train-mend MODEL=model` puts the checkpoint: cache_dir()/mend/<model>/."""
    return cache_dir() / "mend" / model


def has_checkpoint(model: str) -> bool:
    """Whether `make train-mend MODEL=model` has saved a checkpoint for `model` (in checkpoint_dir)."""
    return (checkpoint_dir(model) / "mend.pt").exists()


# ---------------------------------------------------------------- data
def training_cases() -> tuple[list[dict], str]:
    """MEND's training edits: CounterFact's train split and zsRE but its last 100 cases (kept for evaluation)."""
    from ... import data

    cf, zsre = data.load_counterfact("train"), [c for c in data.load_zsre() if c["case_id"] < 900]
    return cf + zsre, f"counterfact:train ({len(cf)}) + zsre:case_id<900 ({len(zsre)})"


@lru_cache(maxsize=1)
def training_ids() -> frozenset[tuple[str, int]]:
    """(dataset, case_id) of `training_cases()`, the edits a default checkpoint was trained on."""
    return frozenset((c["dataset"], int(c["case_id"])) for c in training_cases()[0])


def held_out_cases(n: int = 20, dataset: str = "counterfact", seed: int = 0) -> list[dict]:
    """Cases MEND never trains on: CounterFact's val split, zsRE's cases 900..999."""
    from ... import data

    if dataset == "counterfact":
        return data.load_counterfact("val", n=n, seed=seed)
    return [c for c in data.load_zsre() if c["case_id"] >= 900][:n]


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

    hyperparams = MENDHyperParams
    presets = PRESETS

    def __post_init__(self):
        super().__post_init__()
        self._loaded: "weakref.WeakKeyDictionary[nn.Module, MENDCheckpoint]" = weakref.WeakKeyDictionary()

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
                                    f"run `make train-mend MODEL={model}` (or `python -m editcollapse.cli.mend "
                                    f"train --model {model} --steps N`), or pass checkpoint=<folder>")
                ckpt = MENDCheckpoint.load(folder)
            trained_on = ckpt.meta.get("fingerprint")  # (one for another model is refused by `check`, by name)
            if trained_on is not None and ckpt.meta.get("model") == model \
                    and trained_on != fingerprint(lm, all_weights(lm)):
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
            b = pack(lm, target_pairs(lm, prompts, [r.target_new for r in requests]))
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
            nll_post = mean_nll(lm.model(input_ids=b.ids, attention_mask=b.mask).logits[b.rows, b.cols], b)
        diagnostics = dict(
            layers=",".join(map(str, hp.layers)), mend_nll_pre=nll_pre.mean().item(),
            mend_nll_post=nll_post.mean().item(), mend_p_target=torch.exp(-nll_post).mean().item(),
            mend_grad_cosine=cos, mend_n_factors=int(b.mask.sum()), checkpoint_steps=ckpt.meta["steps"],
            checkpoint_created=ckpt.meta["created"], edit_lrs=net.edit_lrs.tolist(), hparams=asdict(hp))
        return diagnostics

