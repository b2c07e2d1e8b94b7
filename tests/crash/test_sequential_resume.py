"""A sequential run that is SIGKILLed and resumed is the run that was interrupted (issue 18, item 1).

For every editor, a run of six edits on a tiny model is killed twice at random points chosen by
progress, not by wall time: right after an edit was applied (nothing of its step saved), right
after its weights were saved (its row not written yet), or right after a row was written. The
second process resumes the first and is killed again; the test process resumes once more, on a
fresh model object (as a new process would: no cache of the old one). Then the rows equal an
uninterrupted run's, timings aside, and the weights after the last step are bit-identical.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from editcollapse import data
from editcollapse.editors import get_editor, mend
from editcollapse.models.loading import load_model
from editcollapse.experiments.sequential import sequential_run, sequential_store
from tests.device import DEVICE
from tests.fast import FAST, FAST_FT

STEPS = 6
EDITORS = {  # editor: (tiny architecture, hparams); architectures with and without BOS
    "rome": ("tiny-gpt2", FAST),
    "c-rome": ("tiny-llama", FAST),
    "memit": ("tiny-gptj", FAST),
    "alphaedit": ("tiny-llama", FAST),
    "ft-linf": ("tiny-gemma3", FAST_FT),
    "mend": ("tiny-gpt2", {}),
}
KILLS = ("after_apply", "after_save", "after_row")  # the counted event after which the process dies

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    from editcollapse import data
    from editcollapse.experiments import sequential
    from editcollapse.editors import EditStack
    from editcollapse.models.loading import load_model
    from editcollapse.results.store import ResultStore
    out, arch, editor, kill, n, kwargs = sys.argv[1:4] + [sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])]
    cls, attr = dict(after_apply=(EditStack, "apply"), after_save=(sequential.RunState, "save"),
                     after_row=(ResultStore, "append"))[kill]
    real, seen = getattr(cls, attr), [0]
    def dying(*args, **kw):
        value = real(*args, **kw)
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return value
    setattr(cls, attr, dying)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    lm = load_model(arch, device=os.environ.get("EDITCOLLAPSE_TEST_DEVICE", "cpu"))
    sequential.sequential_run(lm, editor, data.load_counterfact(n=%d, seed=5), sequential.sequential_store(out, "seq"),
                              run="k", state_dir=out + "/state", editor_kwargs=kwargs)
    sys.exit(3)  # not killed: the run ended before the chosen event
""" % STEPS)


@pytest.fixture(scope="module")
def mend_folder(tmp_path_factory):
    """A 4-step MEND checkpoint of tiny-gpt2 on disk, for the killed processes and this one."""
    lm = load_model("tiny-gpt2", device=DEVICE)
    ckpt = mend.train(lm, mend.MEND().hparams_for(lm), steps=4, cases=data.load_counterfact("train", n=20),
                      progress=False)
    return str(ckpt.save(tmp_path_factory.mktemp("mend")))


def run(arch, editor, kwargs, out):
    """The run in this process, on a fresh model object."""
    lm = load_model(arch, device=DEVICE)
    sequential_run(lm, get_editor(editor, **kwargs), data.load_counterfact(n=STEPS, seed=5),
                   sequential_store(out, "seq"), run="k", state_dir=out / "state")


def comparable(out):
    rows = sequential_store(out, "seq").read().sort_values("step").reset_index(drop=True)
    return rows.drop(columns=[c for c in rows if c.startswith("seconds")])


@pytest.mark.parametrize("editor", EDITORS)
def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(editor, tmp_path, mend_folder):
    arch, hparams = EDITORS[editor]
    kwargs = dict(hparams=hparams, **({"checkpoint": mend_folder} if editor == "mend" else {}))
    run(arch, editor, kwargs, tmp_path / "whole")

    rng = random.Random(editor)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    # the threads of this process: a product such as cond(W)'s SVD rounds differently with another count
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    kills = []
    for most in (3, 2):  # the first process dies by step 3, so each event happens >= 3 times in the second
        kill, n = rng.choice(KILLS), rng.randint(1, most)
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), arch, editor, kill, str(n),
                               json.dumps(kwargs)], env=env, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, f"{kill} #{n}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        kills.append((kill, n))
    run(arch, editor, kwargs, tmp_path / "killed")

    got, want = comparable(tmp_path / "killed"), comparable(tmp_path / "whole")
    assert got.step.tolist() == list(range(STEPS + 1)), kills
    pd.testing.assert_frame_equal(got[sorted(got)], want[sorted(want)], check_exact=True, obj=f"rows after {kills}")
    state = f"state/{arch}/{editor}/sequential_k.safetensors"
    after, whole = load_file(tmp_path / "killed" / state), load_file(tmp_path / "whole" / state)
    assert after.keys() == whole.keys() and all(after[k].equal(whole[k]) for k in whole), kills
