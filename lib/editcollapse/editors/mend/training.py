"""Training MEND's g and η (Mitchell et al. 2022, Sec. 3.2), and evaluating a trained MEND on held-out cases.

g and η are trained on edits drawn from the zsRE and CounterFact training data: the edit is
computed from the edit prompt, then L_edit (NLL of the target after the edit prompt and after
its rephrase, on the edited model) and L_loc = KL(p(· | x_loc) before ‖ after) on the case's
locality prompt and answer are combined, c_edit·L_edit + c_loc·L_loc, and minimised by Adam
through the edit. `python -m editcollapse.cli.mend train|evaluate` runs them.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...errors import EditError
from ...eval.scoring import mean_nll, pack, target_pairs
from ...models.live import fingerprint
from ...models.loading import LoadedModel
from ...models.nethook import get_module
from ..base import Editor, EditRequest
from ..vstar import _logits
from .editor import (MEND, MENDCheckpoint, MENDHyperParams, all_weights, checkpoint_dir, held_out_cases,
                     training_cases)
from .network import MENDNet, factors_of, gradient_factors, hidden_below, in_out, mlp_weights, run


def _step(lm: LoadedModel, net: MENDNet, hp: MENDHyperParams, cases: list[dict], train: bool):
    """One training (or validation) edit of a batch of cases: (loss, scalars, ΔW per weight).

    One batch holds the edit rows (prompt ⊕ target), their rephrases and the locality rows; the
    layers below the first edited one run once; then the edited layers run twice, before the
    edit (for the factors and the locality reference) and after it (for the losses).
    """
    n = len(cases)
    loc_rows = [lm.token_ids(c["locality_prompt"]) + lm.tok(" " + c["locality_ground_truth"],
                                                            add_special_tokens=False)["input_ids"] for c in cases]
    b = pack(lm, target_pairs(lm, [c["prompt"] for c in cases] + [c["rephrase_prompt"] for c in cases],
                              [c["target_new"] for c in cases] * 2), extra_rows=loc_rows)
    below = hidden_below(lm, min(hp.layers), b.ids, b.mask)
    loc_real = b.mask[2 * n:].bool()
    edit_mask = b.mask.clone()
    edit_mask[n:] = 0  # factors come from the edit rows only
    with torch.enable_grad():
        hidden, seen = run(lm, b.ids, b.mask, probes=net.names, below=below)
        nll_pre = mean_nll(_logits(lm, hidden[b.rows, b.cols]), b)
        factors = factors_of(seen, nll_pre[:n], edit_mask)
    loc_pre = torch.log_softmax(_logits(lm, hidden[2 * n:][loc_real].detach()), -1)
    if train:
        net.observe(factors)
    deltas = net.deltas(factors)
    hidden, _ = run(lm, b.ids, b.mask, deltas=deltas, below=below)
    nll_post = mean_nll(_logits(lm, hidden[b.rows, b.cols]), b)
    loc_post = torch.log_softmax(_logits(lm, hidden[2 * n:][loc_real]), -1)
    l_loc = (loc_pre.exp() * (loc_pre - loc_post)).sum(-1).mean()  # KL(before ‖ after) per locality token
    l_edit = nll_post.mean()
    loss = hp.c_edit * l_edit + hp.c_loc * l_loc
    return loss, dict(loss=loss.item(), l_edit=l_edit.item(), l_loc=l_loc.item(), nll_pre=nll_pre[:n].mean().item(),
                      nll_edit=nll_post[:n].mean().item(), nll_rephrase=nll_post[n:].mean().item(),
                      edit_lr=net.edit_lrs.mean().item()), deltas


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
        net.observe(gradient_factors(lm, modules, pack(lm, target_pairs(lm, [c["prompt"]], [c["target_new"]])))[0])
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
    meta = dict(model=lm.spec.name, fingerprint=fingerprint(lm, all_weights(lm)), layers=list(hp.layers),
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
            b = pack(lm, target_pairs(lm, [c["prompt"]] * 2, [c["target_new"], c["ground_truth"]]))
            nll = mean_nll(_logits(lm, run(lm, b.ids, b.mask, deltas=deltas)[0][b.rows, b.cols]), b)
        rows.append(row)
        success.append(float(nll[0] < nll[1]))
    return dict(val_l_edit=_mean(rows, "l_edit"), val_l_loc=_mean(rows, "l_loc"),
                val_nll_pre=_mean(rows, "nll_pre"), val_nll_edit=_mean(rows, "nll_edit"),
                val_success=sum(success) / len(success))


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def evaluate(lm: LoadedModel, editor: MEND | Editor, cases: list[dict], ppl_size: int = 50) -> dict:
    """Efficacy, generalisation, locality per held-out case (edit, measure, undo); ME-PPL after the first edit."""
    from ...eval.metrics import edit_metrics, locality_reference
    from ...eval.perplexity import me_ppl

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

