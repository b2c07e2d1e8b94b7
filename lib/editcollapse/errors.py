"""The library's error for an edit that cannot be applied (the model is left untouched)."""


class EditError(ValueError):
    """A request, a setting or an optimisation that cannot give a sound edit; nothing was written."""
