"""The headless runner: SET / ONLY parsing (from the Makefile as from the command line), parameter types
checked before any notebook starts, and executed notebooks without progress bars."""
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import nbformat
import papermill
import pytest

from editcollapse import reproduce
from editcollapse.cli.reproduce import main, parse_only
from editcollapse.params import check_types, parameter_examples, parameter_schema, parse_overrides
from editcollapse.paths import REPO_ROOT
from editcollapse.reproduce import NotebookError, find_notebooks, run, strip_progress


def test_set_values_may_hold_spaces_and_several_pairs():
    assert parse_overrides(["editors=[rome, c-rome]"]) == {"editors": ["rome", "c-rome"]}
    assert parse_overrides(["n_counterfact=100 editors=[rome, c-rome]  model=llama2-7b", "n_zsre=null"]) == dict(
        n_counterfact=100, editors=["rome", "c-rome"], model="llama2-7b", n_zsre=None)
    assert parse_overrides(["prefix=The answer is", "opts={a: 1, b: [x, y]}"]) == dict(
        prefix="The answer is", opts={"a": 1, "b": ["x", "y"]})
    assert parse_overrides(["name='01' title='x y=z' note=it's fine"]) == dict(name="01", title="x y=z",
                                                                               note="it's fine")
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["editors"])
    with pytest.raises(ValueError, match=r"--set editors: '\[rome, c-rome' is not a YAML value"):
        parse_overrides(["editors=[rome, c-rome"])


def test_only_accepts_commas_and_spaces_and_refuses_nothing():
    assert parse_only("01, 02") == parse_only("01,02") == parse_only(" 01 02 ") == ["01", "02"]
    for empty in ("", " ", ","):
        with pytest.raises(ValueError, match="--only needs notebook numbers"):
            parse_only(empty)
    with pytest.raises(ValueError, match="non-empty list"):
        find_notebooks([])
    assert [p.stem[:2] for p in find_notebooks(["01", "02"])] == ["01", "02"]


def test_command_line_errors(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(reproduce, "run", lambda *a, **k: calls.append(a) or [("01_x", 1.0)])
    with pytest.raises(SystemExit) as exit_:
        main(["--only", ""])
    assert exit_.value.code == 2 and "--only needs notebook numbers" in capsys.readouterr().err
    assert calls == []
    main(["--only", "01, 02", "--set", "editors=[rome, c-rome] n_zsre=2", "--set", "seed=1"])
    assert calls == [("quick", ["01", "02"], {"editors": ["rome", "c-rome"], "n_zsre": 2, "seed": 1})]


def test_the_makefile_passes_set_and_only_as_written(tmp_path, monkeypatch):
    """`make reproduce SET=... ONLY=...` with a stand-in python that records its arguments."""
    argv_file = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_file}\n')
    fake.chmod(0o755)
    (tmp_path / "stamp").touch()  # setup counts as done
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "MAKEFLAGS")}
    subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "reproduce", f"PY={fake}", f"STAMP={tmp_path / 'stamp'}",
                    "SET=editors=[rome, c-rome] n_zsre=2", "ONLY=01, 02"], check=True, env=env)
    argv = argv_file.read_text().splitlines()
    assert argv[:2] == ["-m", "editcollapse.cli.reproduce"]
    calls = []
    monkeypatch.setattr(reproduce, "run", lambda *a, **k: calls.append(a) or [("01_x", 1.0)])
    main(argv[2:])
    assert calls == [("quick", ["01", "02"], {"editors": ["rome", "c-rome"], "n_zsre": 2})]
    subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "reproduce", f"PY={fake}", f"STAMP={tmp_path / 'stamp'}"],
                   check=True, env=env)
    assert argv_file.read_text().splitlines() == ["-m", "editcollapse.cli.reproduce", "--profile", "quick"]


BAD_ARGUMENTS = [  # (command line, what the refusal must name)
    ("--set n_cases=-5", "n_cases"), ("--set n_cases=0", "n_cases"), ("--set n_cases=abc", "n_cases"),
    ("--set n_cases=2.5", "n_cases"), ("--set n_cases=true", "n_cases"), ("--set n_cases=null", "n_cases"),
    ("--set 'n_cases=5 n_cases=6'", "n_cases"), ("--set n_cases=5 --set n_cases=6", "n_cases"),
    ("--set n_ppl=51", "n_ppl"), ("--set n_ppl=50.0", "n_ppl"), ("--set \"n_ppl='50'\"", "n_ppl"),
    ("--set n_ppl_filter=100", "n_ppl_filter"),
    ("--set 'editors=[rome, romee]'", "editors"), ("--set editors=[]", "editors"), ("--set editors=rome", "editors"),
    ("--set 'editors=[rome, rome]'", "editors"), ("--set 'editors=[rome, 5]'", "editors"),
    ("--set 'random_editors=[memit, mendd]'", "random_editors"),
    ("--set device=tpu", "device"), ("--set device=cuda:x", "device"), ("--set device=3", "device"),
    ("--set device=CPU", "device"),
    ("--set model=gpt5", "model"), ("--set model=null", "model"), ("--set bos_model=gpt-j", "bos_model"),
    ("--set second2first_model=null", "second2first_model"),
    ("--set 'guard_models=[gemma3-270m, nope]'", "guard_models"),
    ("--set seed=-1", "seed"), ("--set seed=1.5", "seed"),
    ("--set n_downstream=0", "n_downstream"), ("--set 'n_downstream={piqa: 0}'", "n_downstream"),
    ("--set 'n_downstream={arc: 10}'", "n_downstream"), ("--set n_downstream=[10]", "n_downstream"),
    ("--set 'downstream_tasks=[piqa, arc]'", "downstream_tasks"), ("--set downstream_tasks=piqa", "downstream_tasks"),
    ("--set n_counterfact=-1", "n_counterfact"), ("--set n_zsre=abc", "n_zsre"),
    ("--set n_first_token=-2", "n_first_token"), ("--set mom2_tokens=0", "mom2_tokens"),
    ("--set c_tokens=-100", "c_tokens"), ("--set c_seq_lens=[]", "c_seq_lens"),
    ("--set 'c_seq_lens=[64, 0]'", "c_seq_lens"), ("--set 'c_seq_lens=[64, 64]'", "c_seq_lens"),
    ("--set first_shares=[1.5]", "first_shares"), ("--set first_shares=[]", "first_shares"),
    ("--set endpoint_timeout=0", "endpoint_timeout"), ("--set endpoint_timeout=-1", "endpoint_timeout"),
    ("--set endpoint_timeout=.nan", "endpoint_timeout"), ("--set first_token=maybe", "first_token"),
    ("--set max_subject_tokens=0", "max_subject_tokens"), ("--set 'hardedit_path=data/{oops}.json'", "hardedit_path"),
    ("--set results_dir=", "results_dir"), ("--set hardcf=null", "hardcf"), ("--set n_screen=-1", "n_screen"),
    ("--set n_random=0", "n_random"), ("--set n_texts=-1", "n_texts"), ("--set offline_calls=-1", "offline_calls"),
    ("--set n_bos_cases=0", "n_bos_cases"), ("--set n_c_cases=[1]", "n_c_cases"), ("--set n_edits=0", "n_edits"),
    ("--set n_second2first=two", "n_second2first"), ("--set n_confirm=-1", "n_confirm"), ("--set n_margin=x", "n_margin"),
    ("--set 'model_sizes={smollm2-135m: {n_confirm: -1}}'", "model_sizes"),
    ("--set 'model_sizes={smollm2-135m: {n_screens: 5}}'", "model_sizes"),
    ("--profile ../params/quick", "profile"), (f"--profile {REPO_ROOT}/notebooks/params/quick", "profile"),
    ("--profile quick.yaml", "profile"), ("--profile ''", "profile"), ("--profile ../../../etc/passwd", "profile"),
    ("--profile ../", "profile"),
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail a test at once if a command line gets past the checks (to the machine check or a notebook)."""
    def passed(*args, **kwargs):
        raise AssertionError("the arguments passed validation")

    monkeypatch.setattr(reproduce, "check_machine", passed)
    monkeypatch.setattr(papermill, "execute_notebook", passed)


@pytest.mark.parametrize("command, name", BAD_ARGUMENTS, ids=[c for c, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_naming_the_parameter(nothing_runs, command, name):
    with pytest.raises(SystemExit) as refused:
        main(shlex.split(command))
    message = str(refused.value.code)
    assert message.startswith("reproduce: ") and re.search(rf"(parameter '{name}'|--set {name} |profile)", message)
    assert name in message


def test_there_are_at_least_40_bad_argument_sets():
    assert len(BAD_ARGUMENTS) >= 40 and len({c for c, _ in BAD_ARGUMENTS}) == len(BAD_ARGUMENTS)


def test_every_profile_and_good_overrides_are_accepted():
    profiles = sorted(p.stem for p in (reproduce.NOTEBOOKS_DIR / "params").glob("*.yaml"))
    assert {"quick", "paper"} <= set(profiles)
    for profile in profiles:
        notebooks, params = reproduce.prepare(profile)
        assert list(params) == [p.stem for p in notebooks] == [p.stem for p in find_notebooks()]
    good = parse_overrides(["model=llama2-7b editors=[rome, c-rome] n_counterfact=100 n_zsre=null device=cuda:1",
                            "n_downstream={piqa: 5, squad2: 7} first_shares=[0, 1] endpoint_timeout=60 seed=0",
                            "random_editors=[] downstream_tasks=[] guard_models=[] bos_model=null first_token=true",
                            "hardedit_path=out/{model}.json n_ppl=10000 c_tokens=null"])
    _, params = reproduce.prepare("quick", overrides=good)
    assert params["02_single_edit"]["editors"] == ["rome", "c-rome"]
    assert params["01_pilot_observation"]["n_ppl"] == 10000
    assert reproduce.prepare("paper", only=["02"], overrides=dict(device="cpu", model="smollm2-135m"))[0][0].stem == \
        "02_single_edit"


def test_the_schema_covers_every_parameter_of_the_notebooks():
    declared = set().union(*(papermill.inspect_notebook(str(p)) for p in find_notebooks()))
    assert set(parameter_schema()) == declared


def test_a_bad_value_in_a_profile_names_profile_and_notebook(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "mine.yaml").write_text("common: {n_ppl: 50}\n01_x: {n_ppl: 51}\n")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("n_ppl = 50", metadata={"tags": ["parameters"]})]
    nbformat.write(nb, tmp_path / "01_x.ipynb")
    with pytest.raises(ValueError, match=r"profile 'mine', 01_x: parameter 'n_ppl' must be an ME-PPL size, one of "
                                         r"50, 1000, 10000, got the int 51"):
        reproduce.prepare("mine", notebooks_dir=tmp_path)


def test_a_parameter_without_a_schema_keeps_the_types_it_has_elsewhere():
    """Notebooks outside this repository: the types of the parameter's values in the profiles and cells."""
    check_types(dict(n_downstream=None, device=None, n_zsre=None, editors=[], seed=1), parameter_examples(
        reproduce.NOTEBOOKS_DIR, {p.stem: papermill.inspect_notebook(str(p)) for p in find_notebooks()}))
    check_types(dict(lr=1), {"lr": [0.5]})  # an int where a float goes
    with pytest.raises(ValueError, match=r"--set n='x': parameter 'n' expects int \(.*\), got the str 'x'"):
        check_types(dict(n="x"), {"n": [2]})
    with pytest.raises(ValueError, match=r"expects a list of str .*got \['a', 5\]"):
        check_types(dict(names=["a", 5]), {"names": [["a"]]})


def test_strip_progress_keeps_the_notebooks_own_output():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x", outputs=[
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": "m", "version_major": 2, "version_minor": 0},
            "text/plain": "loglikelihood:   0%|          | 0/4 [00:00<?, ?it/s]"}),
        nbformat.v4.new_output("stream", name="stdout", text="hello 12% [00:01<00:02] stays: stdout is the notebook's\n"),
        nbformat.v4.new_output("stream", name="stderr", text="\rLoading weights:   0%|   | 0/3 [00:00<?, ?it/s]"
                                                             "\rLoading weights: 100%|###| 3/3 [00:00<00:00, 9.1it/s]"),
        nbformat.v4.new_output("stream", name="stderr", text="\nUserWarning: keep me\n"),
        nbformat.v4.new_output("stream", name="stderr", text="\x1b[A"),  # a nested bar moved the cursor
        nbformat.v4.new_output("stream", name="stderr", text="\x1b[31mred stays\x1b[0m\n"),
        nbformat.v4.new_output("stream", name="stderr", text="generate: 5it [00:01, 4.1it/s]\nreal line\n"),
        nbformat.v4.new_output("display_data", data={"text/plain": "a table"}),
    ])]
    assert strip_progress(nb) == 5
    assert [(o.output_type, o.get("text", o.get("data", {}).get("text/plain"))) for o in nb.cells[0].outputs] == [
        ("stream", "hello 12% [00:01<00:02] stays: stdout is the notebook's\n"),
        ("stream", "UserWarning: keep me\n"), ("stream", "\x1b[31mred stays\x1b[0m\n"), ("stream", "real line\n"),
        ("display_data", "a table")]


NOTEBOOK_CODE = """\
import sys, time, warnings
from tqdm.auto import tqdm
for i in tqdm(range(n), desc="loglikelihood"):
    for j in tqdm(range(2), desc="inner", leave=False):
        time.sleep(0.01)
print("hello", n)
warnings.warn("keep me")
"""


def test_a_headless_run_leaves_no_progress_bars(tmp_path, capfd):
    """A synthetic notebook with a tqdm.auto bar: its progress reaches the runner's stderr, not the saved copy."""
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "quick.yaml").write_text("common: {n: 3}\n")
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                           "language": "python"}, "language_info": {"name": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("n = 2", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(NOTEBOOK_CODE)]
    nbformat.write(nb, tmp_path / "01_bars.ipynb")
    with pytest.raises(ValueError, match="n='x'.*expects int"):
        run("quick", overrides=dict(n="x"), notebooks_dir=tmp_path, executed_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "01_bars.ipynb").exists()
    run("quick", overrides=dict(n=5), notebooks_dir=tmp_path, executed_dir=tmp_path / "out")
    assert "loglikelihood: 100%" in capfd.readouterr().err  # the runner's log shows the bar
    outputs = nbformat.read(tmp_path / "out" / "01_bars.ipynb", as_version=4).cells[-1].outputs
    texts = [o.get("text") or str(o.get("data")) for o in outputs]
    assert any("hello 5" in t for t in texts) and any("keep me" in t for t in texts)
    assert not any("loglikelihood" in t or "inner" in t or "it/s" in t or "\x1b" in t for t in texts), texts
    assert not any("widget" in str(o.get("data", {})) for o in outputs)


def test_repository_notebooks_are_found_by_number():
    with pytest.raises(ValueError, match="no such notebook"):
        find_notebooks(["99"])
    assert all(isinstance(p, Path) for p in find_notebooks(None))
    with pytest.raises(NotebookError, match="declared by no parameters cell"):
        run("quick", only=["01"], overrides=dict(no_such_parameter=1))


def test_a_profile_this_machine_cannot_run_is_refused_before_any_notebook(monkeypatch):
    """The paper profile asks for CUDA and hub weights: without them, a clear refusal and no notebook started."""
    import torch

    def no_notebook(*args, **kwargs):
        raise AssertionError("a notebook was started")

    monkeypatch.setattr(papermill, "execute_notebook", no_notebook)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NotebookError, match="device=cuda, and this machine has no CUDA device"):
        run("paper", only=["02"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # whatever this cache holds
    with pytest.raises(NotebookError, match=r"'gpt-j-6b' \(EleutherAI/gpt-j-6b\) is not in the local Hugging Face "
                                            "cache and HF_HUB_OFFLINE is set"):
        run("paper", only=["02"], overrides=dict(device="cpu"))


def test_mend_is_trained_before_the_first_notebook_that_edits_with_it(monkeypatch, tmp_path):
    """A fresh machine has no MEND checkpoint: the runner trains it (the preset's steps) before any notebook
    starts, and a second run finds it and trains nothing."""
    from editcollapse.editors.mend import PRESETS, checkpoint_dir

    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path))
    started = []
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda *a, **k: started.append((checkpoint_dir("tiny-llama") / "mend.pt").exists()))
    overrides = dict(model="tiny-llama", device="cpu", editors=["rome", "mend"], random_editors=[],
                     results_dir=str(tmp_path / "results"))
    timings = run("quick", only=["03"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert started == [True] and [t[0] for t in timings] == ["train-mend tiny-llama", "03_sequential_edit"]
    meta = json.loads((checkpoint_dir("tiny-llama") / "meta.json").read_text())
    assert meta["model"] == "tiny-llama" and meta["steps"] == PRESETS["tiny-llama"]["train_steps"]
    timings = run("quick", only=["03"], overrides=overrides, executed_dir=tmp_path / "executed")
    assert [t[0] for t in timings] == ["03_sequential_edit"]
    assert reproduce.mend_models({"a": dict(model="m1", editors=["rome"]), "b": dict(model="m2", random_editors=["mend"])}) == ["m2"]


def test_the_local_profile_edits_the_shipped_hardcf_and_the_bos_contrast():
    _, params = reproduce.prepare("local", only=["01", "02", "04", "05"])
    single = params["02_single_edit"]
    assert single["n_hardcf"] is None and single["n_counterfact"] >= 100 and single["n_zsre"] >= 50
    assert set(single["editors"]) == {"rome", "c-rome", "memit", "alphaedit", "ft-linf", "mend"}
    assert single["contrast_model"] == "gemma3-270m" and single["contrast_editors"] == ["rome", "c-rome"]
    assert single["n_contrast_random"] >= 100 and single["n_contrast_first_token"] >= 100
    assert params["04_crome_analysis"]["n_hardcf"] is None and params["04_crome_analysis"]["n_random"] >= 100
    assert params["01_pilot_observation"]["n_hardcf"] >= params["01_pilot_observation"]["n_edits"] >= 5
    assert params["05_hardedit"]["n_cases"] == 49
    quick = reproduce.prepare("quick", only=["02"])[1]["02_single_edit"]
    assert quick["n_hardcf"] == 0 and quick["contrast_model"] is None


@pytest.mark.parametrize("pair", ["n_hardcf=-1", "n_hardcf=all", "contrast_model=gpt-5", "contrast_editors=[rome, rome]",
                                  "n_contrast_random=-1", "n_contrast_first_token=1.5"])
def test_the_contrast_and_hardcf_parameters_are_checked(nothing_runs, pair):
    with pytest.raises(SystemExit) as refused:
        main(["--only", "02", "--set", pair])
    assert pair.partition("=")[0] in str(refused.value.code)


def test_the_profile_plan_prints_every_notebook_from_units_without_measuring(capsys, monkeypatch):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_profile", REPO_ROOT / "bench" / "bench_profile.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_profile", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    total = bench.main(["--profile", "local"])
    out = capsys.readouterr().out
    assert all(f"notebook {n} (profile local)" in out for n in ("01", "02", "03", "04", "05"))
    assert "not measured here" in out and f"{total / 3600:.1f} hours" in out
    assert "rome single edits, hardcf (smollm2-135m)" in out and "(gemma3-270m)" in out
    doubled = bench.main(["--profile", "local", "--only", "05", "--unit", "ppl.50=7.0", "--unit", "edit_metrics=0.5"])
    base = bench.main(["--profile", "local", "--only", "05"])
    assert doubled - base == pytest.approx(6 * (2 * 49 + 2) * 3.5)  # six editors' steps and step 0s, 3.5 s more each
