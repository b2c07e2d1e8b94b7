"""Crash tests: sweeps killed with SIGKILL at random moments, including half-way through a write, then
restarted until done. Invariant: zero rows lost, zero rows duplicated.

Cheap sweeps (no model) run in children forked by one server process, so that each of many lives
costs milliseconds, not an interpreter start. Half of the kills come from the parent at a random
time; the other half are injected: the child writes a random part of its k-th write (a row, or a
line being set aside) and kills itself. One real `single_edit_sweep` (tiny-llama, ROME) is killed
twice as well: once at a random time during its edits, once half-way through a write.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pandas as pd

from editcollapse import data

N_LIVES, N_ITEMS = 40, 300
KILL_HOOK = r"""
import os, random, signal
from editcollapse.results import store as S

def die_in_write(k, seed):
    # from now on, the k-th write puts a random part of its bytes on disk and the process dies
    rng, real, count = random.Random(seed), S._append_bytes, [0]
    def write(path, data):
        count[0] += 1
        if count[0] == k:
            with open(path, "ab") as f:
                f.write(data[: rng.randrange(1, len(data))])
                f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    S._append_bytes = write
"""
SERVER = KILL_HOOK + r"""
import json, sys, time
for line in sys.stdin:  # one life per line: fork a child that runs the sweep, report its pid and exit status
    life = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            rng = random.Random(life["seed"])
            if life["die_in_write"]:
                die_in_write(rng.randrange(1, 5), life["seed"])
            def fn(i):
                time.sleep(rng.random() * 0.003)
                return dict(value=i * i, pad="x" * rng.randrange(300))
            store = S.ResultStore(life["path"], ("case_id",))
            S.run_cases(store, range(life["n"]), fn, lambda i: i, desc="crash test")
            code = 0
        finally:
            os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


def file_keys(path):
    """Keys of the complete rows in the file, in order (a last line cut short does not count)."""
    keys = []
    for line in path.read_bytes().split(b"\n"):
        try:
            keys.append(json.loads(line)["case_id"])
        except ValueError:
            pass
    return keys


def test_killed_cheap_sweeps_lose_and_duplicate_nothing(tmp_path, record_property):
    path, rng, kills, t0 = tmp_path / "sweep.jsonl", random.Random(7), {"timed": 0, "mid-write": 0}, time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "server.err", "w") as err:
        server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=err, text=True, env=env)
        try:
            for life in range(N_LIVES + 1):
                last = life == N_LIVES
                mode = "timed" if life % 2 else "mid-write"
                server.stdin.write(json.dumps(dict(path=str(path), n=N_ITEMS, seed=life,
                                                   die_in_write=mode == "mid-write" and not last)) + "\n")
                server.stdin.flush()
                pid = int(server.stdout.readline())
                if mode == "timed" and not last:
                    time.sleep(rng.uniform(0, 0.08))
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                status = int(server.stdout.readline())
                if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                    kills[mode] += 1
                else:
                    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (tmp_path / "server.err").read_text()
                keys = file_keys(path)
                assert len(keys) == len(set(keys)), f"duplicated rows after life {life}"
        finally:
            server.stdin.close()
            server.wait(timeout=30)
    keys = file_keys(path)
    assert sorted(keys) == list(range(N_ITEMS))  # zero lost, zero duplicated
    rows = pd.read_json(path, lines=True)
    assert (rows.value == rows.case_id ** 2).all()
    survived = kills["timed"] + kills["mid-write"]
    record_property("kills_survived", survived)
    print(f"\ncheap sweep: survived {survived} SIGKILLs ({kills['timed']} at random times, {kills['mid-write']} "
          f"mid-write), {N_ITEMS} rows, 0 lost, 0 duplicated, {time.time() - t0:.1f} s")
    assert kills["mid-write"] >= N_LIVES // 2 - 2 and kills["timed"] >= N_LIVES // 4


REAL = KILL_HOOK + r"""
import sys
from editcollapse import data
from editcollapse.experiments import single
from editcollapse.models.loading import load_model
path, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "mid-write":
    die_in_write(2, seed)  # the second row this life writes
lm = load_model("tiny-llama", device="cpu")
store = S.ResultStore(path, S.ROW_KEY)
print("loaded", flush=True)
single.single_edit_sweep(lm, "rome", data.load_cases("counterfact", 6, 0), store)
"""


def test_killed_single_edit_sweep_loses_and_duplicates_nothing(tmp_path, record_property):
    path, rng, kills, t0 = tmp_path / "single_edit.jsonl", random.Random(3), 0, time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def life(mode):
        proc = subprocess.Popen([sys.executable, "-c", REAL, str(path), mode, str(rng.randrange(100))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if mode == "timed":  # at a random moment after the first row of this life, likely mid-edit
            assert proc.stdout.readline() == "loaded\n", proc.communicate()[1]
            n0 = len(file_keys(path)) if path.exists() else 0
            while (len(file_keys(path)) if path.exists() else 0) == n0 and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.4))
            proc.kill()
        _, err = proc.communicate(timeout=120)
        return proc.returncode == -signal.SIGKILL, err

    for mode in ("timed", "mid-write", "finish"):
        killed, err = life(mode)
        kills += killed
        assert killed == (mode != "finish"), err[-2000:]
    rows = pd.read_json(path, lines=True)
    assert sorted(rows.case_id) == [c["case_id"] for c in data.load_cases("counterfact", 6, 0)]
    assert not rows.duplicated(["experiment", "model", "editor", "dataset", "case_id"]).any()
    assert rows.error.isna().all() and rows.ppl.gt(1).all()
    record_property("kills_survived", kills)
    print(f"\nsingle_edit_sweep (tiny-llama, rome): survived {kills} SIGKILLs, {len(rows)} rows, 0 lost, "
          f"0 duplicated, {time.time() - t0:.1f} s")
