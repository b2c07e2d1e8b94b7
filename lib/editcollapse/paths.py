"""Where the repository's data lives and where caches (converted models, statistics) go."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """`data/` of the repository (override with EDITCOLLAPSE_DATA)."""
    return Path(os.environ.get("EDITCOLLAPSE_DATA", REPO_ROOT / "data"))


def cache_dir() -> Path:
    """User cache outside git (override with EDITCOLLAPSE_CACHE); created on demand."""
    d = Path(os.environ.get("EDITCOLLAPSE_CACHE", Path.home() / ".cache" / "editcollapse"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def in_repo(path: str | Path) -> Path:
    """A relative path taken from the repository root (notebooks run with notebooks/ as cwd)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def results_dir() -> Path:
    d = Path(os.environ.get("EDITCOLLAPSE_RESULTS", REPO_ROOT / "results"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def figures_dir() -> Path:
    """`figures/` of the repository (override with EDITCOLLAPSE_FIGURES)."""
    d = Path(os.environ.get("EDITCOLLAPSE_FIGURES", REPO_ROOT / "figures"))
    d.mkdir(parents=True, exist_ok=True)
    return d
