"""The house rules of the library (docs/architecture.md): imports go down the layers only, no module grows past
~400 lines, command lines live in cli/, generic code never asks which editor it holds, notebooks tell the story."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "lib" / "editcollapse"
# Lower layers never import higher ones; a layer may import itself.
LAYERS = [
    {"errors", "request", "paths", "machine"},
    {"data", "results"},
    {"models"},
    {"eval"},
    {"editors"},
    {"guard"},
    {"experiments"},
    {"hardcases"},
    {"analysis"},
    {"params", "widgets", "reproduce"},
    {"cli"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MODULES = sorted(p for p in LIB.rglob("*.py") if "lmeval_tasks" not in p.parts)


def unit_of(path: Path) -> str:
    return path.relative_to(LIB).parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    """The library's top-level units (`models`, `editors`, `guard`, ...) that `path` imports."""
    package = list(path.relative_to(LIB).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = (package[: len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
                names = parts[:1] or [a.name for a in node.names]
            elif (node.module or "").startswith("editcollapse"):
                parts = node.module.split(".")[1:]
                names = parts[:1] or [a.name for a in node.names]
            else:
                continue
            out.update(n for n in names if n in LAYER)
    return out


def test_every_unit_has_a_layer():
    assert {unit_of(p) for p in MODULES} - {"__init__"} <= set(LAYER)


@pytest.mark.parametrize("path", [p for p in MODULES if p.parent != LIB or p.name != "__init__.py"],
                         ids=lambda p: str(p.relative_to(LIB)))
def test_imports_go_down_the_layers(path):
    unit = unit_of(path)
    upward = sorted(u for u in imported_units(path) if LAYER[u] > LAYER[unit])
    assert upward == [], f"{path.relative_to(LIB)} ({unit}) imports higher layers {upward}"


def test_no_module_holds_more_than_about_400_lines():
    long = {str(p.relative_to(LIB)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}


def test_command_lines_live_in_cli_only():
    """No argparse outside cli/; a `__main__` block outside it only says where the command moved."""
    moved = re.compile(r'__name__ == "__main__":[^\n]*\n\s+raise SystemExit\("the command line moved: ')
    found = [str(p.relative_to(LIB)) for p in MODULES if p.parent.name != "cli"
             and (re.search(r"^\s*import argparse", text := p.read_text(), re.M)
                  or text.count("__main__") != len(moved.findall(text)))]
    assert found == []


def test_generic_code_never_checks_which_editor_it_holds():
    concrete = r"(ROME|MEMIT|AlphaEdit|FT|MEND)"
    pattern = re.compile(rf"isinstance\([^)]*\b{concrete}\b|__name__ == ['\"]{concrete}['\"]")
    found = [f"{p.relative_to(LIB)}:{i}" for p in MODULES if "editors" not in p.parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("0*.ipynb")), ids=lambda p: p.name)
def test_notebooks_tell_the_story_in_at_most_120_code_lines(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = sum(1 for c in cells for line in "".join(c["source"]).splitlines() if line.strip())
    assert lines <= 120
