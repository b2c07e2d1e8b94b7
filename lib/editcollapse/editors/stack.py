"""A sequence of edits on one model, undone exactly and last-first (sequential editing, Butterfly Effect Sec. 4)."""
from __future__ import annotations

from ..models.loading import LoadedModel
from .base import EditResult, Editor, sigint_deferred


class EditStack:
    """`with EditStack(lm) as stack: stack.apply(editor, request) ...` leaves the model as it found it.

    Edits are applied in order on the already edited model; `undo_last` / `undo_all` take them
    back last-first, which restores bit-identical weights. An edit of the stack can only be
    undone through the stack, in that order (EditResult.undo refuses any other order).

    On exit every edit is undone, and a Ctrl-C meanwhile waits until all are. An error raised in the
    block propagates as it is; when the rollback fails too, a note on it says why and what is still applied.
    """

    def __init__(self, lm: LoadedModel):
        self.lm, self.results = lm, []

    def apply(self, editor: Editor, requests) -> EditResult:
        result = editor.apply(self.lm, requests)
        self.results.append(result)
        return result

    def undo_last(self) -> EditResult:
        result = self.results[-1]
        result.undo()  # refuses if an edit outside the stack was applied after it
        self.results.pop()
        return result

    def undo_all(self) -> None:
        while self.results:
            self.undo_last()

    def __len__(self) -> int:
        return len(self.results)

    def __enter__(self) -> "EditStack":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with sigint_deferred():
            try:
                self.undo_all()
            except Exception as failed:
                if exc is None:
                    raise
                exc.add_note(f"EditStack could not roll back ({type(failed).__name__}: {failed}); "
                             f"{len(self.results)} edit(s) of the stack are still applied")
