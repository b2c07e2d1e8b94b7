"""Every JSON, CSV or notebook that the project writes goes through `paths.atomic_write_text`: a write that
dies before its rename leaves the old file whole (no half-written JSON, no temporary file)."""
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from editcollapse import data, paths

from editcollapse.hardcases import hardcf, hardedit
from editcollapse.cli import mend

LIB = Path(paths.__file__).parent
# every module of the library and every bench, but the helper itself and the results store (an append-only
# log, whose one rewrite, of bad lines set aside, is its own temporary file renamed under the writer's lock)
WRITERS = sorted({*LIB.rglob("*.py"), *(LIB.parents[1] / "bench").glob("*.py")} - {LIB / "paths.py", LIB / "results" / "store.py"})


def test_atomic_write_text_replaces_whole(tmp_path):
    path = tmp_path / "new" / "dir" / "out.json"
    assert paths.atomic_write_text(path, "[1]") == path and path.read_text() == "[1]"
    paths.atomic_write_text(path, "[2, \u00e9]")
    assert path.read_text(encoding="utf-8") == "[2, \u00e9]"
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # the umask applies, as for open()
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


@pytest.fixture
def dying_rename(monkeypatch):
    """os.replace fails, as a process killed between writing and renaming would leave things."""
    def replace(*args, **kwargs):
        raise OSError("killed before the rename (simulated)")
    monkeypatch.setattr(os, "replace", replace)


def check_untouched(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('["old"]')
    with pytest.raises(OSError, match="simulated"):
        write()
    assert path.read_text() == '["old"]'
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_atomic_write_text_keeps_the_old_file(tmp_path, dying_rename):
    check_untouched(tmp_path / "a.json", lambda: paths.atomic_write_text(tmp_path / "a.json", "[1]"))


def test_hardcf_writes_atomically(tmp_path, dying_rename):
    case = data.load_counterfact(n=1, seed=0)[0]
    rows = pd.DataFrame([dict(case_id=case["case_id"], dataset="counterfact", ppl=5000.0, model="m", editor="rome",
                              first_token=True)])
    check_untouched(tmp_path / "hardcf.json", lambda: hardcf.sweep_hardcf(rows, tmp_path / "hardcf.json"))


def test_write_hardcf_writes_atomically(tmp_path, dying_rename):
    case = data.load_counterfact(n=1, seed=0)[0]
    confirmed = pd.DataFrame([dict(case_id=case["case_id"], label=True, ppl=5000.0, denominator=0.1,
                                   denominator_raw=0.05, score=3.0, first_token=True, stratum="flagged")])
    meta = dict(model="m", editor="rome")
    check_untouched(tmp_path / "h.json", lambda: hardcf.write_hardcf(tmp_path / "h.json", confirmed,
                                                                    {case["case_id"]: case}, meta))


def test_write_hardedit_writes_atomically(tmp_path, dying_rename):
    case = dict(data.load_counterfact(n=1, seed=0)[0], generator="offline", generation_prompt="p",
                generation_settings={}, rephrase_is_prompt=True)
    rows = pd.DataFrame([dict(case_id=case["case_id"], kept=True, ppl=5000.0, ppl_size=50, denominator=0.1,
                              first_token=True)])
    check_untouched(tmp_path / "e.json", lambda: hardedit.write_hardedit(tmp_path / "e.json", rows, [case],
                                                                        dict(model="m")))


def test_mend_evaluation_writes_atomically(tmp_path, monkeypatch, dying_rename):
    import editcollapse.models.loading

    monkeypatch.setattr(editcollapse.models.loading, "load_model", lambda name: None)
    monkeypatch.setattr(mend, "MEND", lambda checkpoint=None: None)
    monkeypatch.setattr(mend, "held_out_cases", lambda n, dataset: [])
    monkeypatch.setattr(mend, "evaluate", lambda lm, editor, cases: dict(n=0, rows=[]))
    check_untouched(tmp_path / "eval_counterfact.json", lambda: mend.main(["evaluate", "--checkpoint", str(tmp_path)]))


def test_the_writers_write_json_only_through_the_helper():
    """No direct write of a file (write_text, json.dump, to_csv, to_json, open for writing) in these modules."""
    direct = re.compile(r"\.write_text\(|json\.dump\(|\.to_csv\((?!index=)|\.to_json\(|nbformat\.write\(|"
                        r"open\([^)]*['\"][wa]")
    found = [f"{path.name}:{i}: {line.strip()}" for path in WRITERS
             for i, line in enumerate(path.read_text().splitlines(), 1) if direct.search(line)]
    assert len(WRITERS) > 40
    assert found == []
