"""Editors: each applies an EditRequest to a live model and returns an EditResult with an exact undo."""
from .base import EditError, EditRequest, EditResult, edited
from .rome import ROME, ROMEHyperParams

EDITORS = {
    "rome": lambda **kw: ROME(consistent=False, **kw),
    "c-rome": lambda **kw: ROME(consistent=True, **kw),
    "c-rome-prefix": lambda **kw: ROME(consistent=True, test_prefix=True, **kw),
}


def get_editor(name: str, **kwargs):
    """An editor by name: rome, c-rome, c-rome-prefix."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    return EDITORS[name](**kwargs)


__all__ = ["EDITORS", "EditError", "EditRequest", "EditResult", "ROME", "ROMEHyperParams", "edited", "get_editor"]
