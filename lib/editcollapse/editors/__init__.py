"""Editors: each applies one EditRequest or a batch to a live model and returns an EditResult with an exact undo.

`get_editor(name, **kwargs)` builds a registered editor; `EDITORS` lists them. Every editor
follows the contract of `base` (validated, atomic, ordered exact undo, common diagnostics);
tests/unit/test_editor_contract.py checks it for each one on every tiny architecture.
"""
from ..errors import EditError
from ..models.live import live_edits
from ..request import EditRequest
from .base import EditResult, Editor, edited
from .ft import FT, FTHyperParams
from .mend import MEND, MENDHyperParams
from .alphaedit import AlphaEdit, AlphaEditHyperParams
from .memit import MEMIT, MEMITHyperParams
from .rome import ROME, ROMEHyperParams
from .stack import EditStack

EDITORS = {
    "rome": lambda **kw: ROME(consistent=False, **kw),
    "c-rome": lambda **kw: ROME(consistent=True, **kw),
    "c-rome-prefix": lambda **kw: ROME(consistent=True, test_prefix=True, **kw),
    "rome-2k": lambda **kw: ROME(two_keys=True, **kw),
    "ft-linf": FT,
    "mend": MEND,
    "memit": MEMIT,
    "memit-2k": lambda **kw: MEMIT(bare_key=True, **kw),
    "alphaedit": AlphaEdit,
    "alphaedit-2k": lambda **kw: AlphaEdit(bare_key=True, **kw),
}


def get_editor(name: str, **kwargs) -> Editor:
    """An editor by name (see EDITORS); kwargs go to its constructor, e.g. hparams={...}."""
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; known editors: {', '.join(EDITORS)}")
    return EDITORS[name](**kwargs)


__all__ = ["EDITORS", "EditError", "EditRequest", "EditResult", "EditStack", "Editor", "ROME", "ROMEHyperParams",
           "edited", "get_editor", "live_edits", "MEMIT", "MEMITHyperParams", "AlphaEdit", "AlphaEditHyperParams",
           "FT", "FTHyperParams", "MEND", "MENDHyperParams"]
