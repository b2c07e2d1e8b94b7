"""Where the repository's data lives and where caches (converted models, statistics) go."""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
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


def cli_path(path: str) -> Path | str:
    """A path given on a command line (argparse `type=`): relative to the current directory, as every
    command line reads it, made absolute so that `in_repo` keeps it. '' stays '' (a CLI's "nowhere")."""
    return Path(path).expanduser().resolve() if path else path


def figures_dir() -> Path:
    """`figures/` of the repository (override with EDITCOLLAPSE_FIGURES)."""
    d = Path(os.environ.get("EDITCOLLAPSE_FIGURES", REPO_ROOT / "figures"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` whole or not at all (`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes | Iterable[bytes]) -> Path:
    """Write `data` to `path` whole or not at all: a temporary file in the same folder, fsynced, then
    os.replace. Readers see the old file or the new one, never a part; the folder is created. `data` may
    be an iterable of blocks (a large file streamed): an exception it raises leaves the old file too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open(path, "w")
    try:
        with os.fdopen(fd, "wb") as f:
            for block in [data] if isinstance(data, bytes) else data:
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
