"""What the bench scripts share: the command line's common options and the model they load."""
from __future__ import annotations

import argparse
import time

import torch

from editcollapse import load_model
from editcollapse.editors import ROME
from editcollapse.keys import context_templates


def parser(doc: str, cases: int = 3) -> argparse.ArgumentParser:
    """--model, --cases and --threads, with the script's first docstring line as description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", type=int, default=cases)
    ap.add_argument("--threads", type=int, default=None)
    return ap


def load(args, templates: bool = False):
    """The model of --model with --threads torch threads; templates=True samples ROME's context templates once
    (as the papers' code caches them across edits) and prints how long that took."""
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    line = f"{args.model} on {lm.device}, {torch.get_num_threads()} threads"
    if templates:
        hp = ROME().hparams_for(lm)
        t0 = time.perf_counter()
        context_templates(lm, hp.context_template_length_params, hp.seed)
        line += f"; context templates sampled once in {time.perf_counter() - t0:.2f} s"
    print(line, flush=True)
    return lm
