"""editcollapse: model collapse caused by knowledge editing (Yang et al., ACL 2024 / EMNLP 2024 Findings)."""
from .models.loading import DEFAULT_MODEL, REGISTRY, LoadedModel, ModelLoadError, ModelSpec, load_model

__all__ = ["DEFAULT_MODEL", "REGISTRY", "LoadedModel", "ModelLoadError", "ModelSpec", "load_model"]
