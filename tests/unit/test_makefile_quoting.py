"""Make variables are data: hostile values of every variable that reaches a command (shell syntax, command
substitution, make functions, quotes, spaces, newlines) run nothing and arrive as written. A stand-in python
records the arguments that make passes it; for `-c` it runs the real interpreter (the argument splitter)."""
import os
import shlex
import subprocess
import sys

import pytest

from editcollapse.paths import REPO_ROOT

HOSTILE = [
    "quick; touch {pwned}",
    "$(touch {pwned})",
    "`touch {pwned}`",
    "$(shell touch {pwned})",  # a make function: make must not expand the value
    '" ; touch {pwned}; echo "',
    "' ; touch {pwned}; echo '",
    "x && touch {pwned} || touch {pwned}",
    "x | tee {pwned} > {pwned}",
    "x\ntouch {pwned}",
    "a b  c",
    "$$HOME ${{HOME}} \\ * ? # % \\",
    "editors=[rome, c-rome] note='it''s' \"q\"",
]
# variable -> (make target, the arguments the command gets for value v; None: v is split into words)
ONE_ARGUMENT = {
    "PROFILE": ("reproduce", lambda v: ["-m", "editcollapse.cli.reproduce", "--profile", v]),
    "ONLY": ("reproduce", lambda v: ["-m", "editcollapse.cli.reproduce", "--profile", "quick", "--only", v]),
    "SET": ("reproduce", lambda v: ["-m", "editcollapse.cli.reproduce", "--profile", "quick", "--set", v]),
    "MODEL": ("train-mend", lambda v: ["-m", "editcollapse.cli.mend", "train", "--model", v, "--profile", "quick"]),
    "STEPS": ("train-mend", lambda v: ["-m", "editcollapse.cli.mend", "train", "--model", "smollm2-135m",
                                       "--profile", "quick", "--steps", v]),
}
SPLIT = {  # several arguments, split as a shell splits words (shlex), nothing expanded
    "PYTEST_ARGS": ("test", ["-m", "pytest"]),
    "BENCH_ARGS": ("bench", ["bench/bench_all.py", "--model", "smollm2-135m"]),
    "TORCH_PIP_ARGS": ("setup", ["-m", "pip", "install", "torch==2.13.0"]),
}


def make(tmp_path, target, **variables):
    """Run `make target` with a stand-in python; returns (completed process, argv of each call it recorded)."""
    calls = tmp_path / "calls"
    calls.mkdir(exist_ok=True)
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = -c ] && [ "$2" = "import torch" ]; then exit 1; fi  # torch missing: setup installs it
if [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi
printf '%s\\0' "$@" > {calls}/$(ls {calls} | wc -l)
""")
    fake.chmod(0o755)
    stamp = tmp_path / "stamp"
    if target != "setup":
        stamp.touch()  # setup counts as done
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "MAKEFLAGS", "MFLAGS")}
    proc = subprocess.run(["make", "-s", "-C", str(REPO_ROOT), target, f"PY={fake}", f"STAMP={stamp}",
                           *(f"{k}={v}" for k, v in variables.items())], env=env, capture_output=True, text=True)
    recorded = [(calls / str(i)).read_bytes().split(b"\0")[:-1] for i in range(len(list(calls.iterdir())))]
    return proc, [[a.decode() for a in call] for call in recorded]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("name", [*ONE_ARGUMENT, *SPLIT])
def test_a_hostile_make_value_runs_nothing_and_arrives_as_written(tmp_path, name, value):
    pwned = tmp_path / "pwned"
    value = value.format(pwned=pwned)
    proc, calls = make(tmp_path, ONE_ARGUMENT[name][0] if name in ONE_ARGUMENT else SPLIT[name][0], **{name: value})
    assert not pwned.exists(), f"{name}={value!r} ran a command"
    if name in ONE_ARGUMENT:
        assert proc.returncode == 0, proc.stderr
        assert calls == [ONE_ARGUMENT[name][1](value)]
        return
    target, command = SPLIT[name]
    try:
        words = shlex.split(value)
    except ValueError:  # an unclosed quote: refused, with the variable named
        assert proc.returncode != 0 and f"make: {name}=" in proc.stderr and "does not split" in proc.stderr
        assert calls == []
        return
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == command + words


def test_split_variables_group_quoted_words(tmp_path):
    proc, calls = make(tmp_path, "test-unit", PYTEST_ARGS="-k 'rome and not slow' -x")
    assert proc.returncode == 0, proc.stderr
    assert calls == [["-m", "pytest", "tests/unit", "-k", "rome and not slow", "-x"]]
    proc, calls = make(tmp_path, "bench")
    assert calls[-1] == ["bench/bench_all.py", "--model", "smollm2-135m"]
