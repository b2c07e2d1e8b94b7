"""The results store under threads and through other paths to the same file: each key stored once, one lock."""
import subprocess
import sys
import threading

import pytest

from editcollapse.results.store import ResultStore, StoreLocked, run_cases
from tests.unit.test_store import holding

N_THREADS, N_KEYS = 4, 200


def in_threads(target, n=N_THREADS):
    """Run target(i) in n threads started together; re-raise the first exception of any of them."""
    start, errors = threading.Barrier(n), []

    def body(i):
        start.wait()
        try:
            target(i)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_threads_appending_the_same_keys_store_each_once(tmp_path):
    """append() is check-and-write under one lock: one thread stores a key, the others get "already stored"."""
    store = ResultStore(tmp_path / "res.jsonl", ("id",))
    stored, refused = [], []

    def appender(i):
        for k in range(N_KEYS):
            try:
                store.append(dict(id=k, thread=i))
                stored.append(k)
            except ValueError as e:
                assert "already stored" in str(e)
                refused.append(k)

    in_threads(appender)
    assert sorted(stored) == list(range(N_KEYS)) and len(refused) == (N_THREADS - 1) * N_KEYS
    assert len(store.path.read_text().splitlines()) == N_KEYS
    assert sorted(ResultStore(store.path, ("id",)).read().id) == list(range(N_KEYS))


def test_threads_running_one_sweep_store_each_key_once(tmp_path):
    """run_cases in threads sharing a store (or each with its own store of the file): a key another thread
    stored meanwhile is skipped, as a key stored before the sweep is; nothing is written twice."""
    path = tmp_path / "res.jsonl"
    shared = ResultStore(path, ("id",))
    written = []

    def sweeper(i):
        store = shared if i % 2 else ResultStore(path, ("id",))
        written.append(run_cases(store, range(N_KEYS), lambda k: dict(thread=i), lambda k: k))

    in_threads(sweeper)
    assert sum(written) == N_KEYS and len(path.read_text().splitlines()) == N_KEYS
    assert sorted(ResultStore(path, ("id",)).read().id) == list(range(N_KEYS))


def test_the_lock_is_released_after_threads_wrote(tmp_path):
    """Threads that became the writer together hold the lock once: close() releases it for another process."""
    store = ResultStore(tmp_path / "res.jsonl", ("id",))
    in_threads(lambda i: store.append(dict(id=i)))
    store.close()
    subprocess.run([sys.executable, "-c", "import sys; from editcollapse.results.store import ResultStore; "
                    "ResultStore(sys.argv[1], ('id',)).append(dict(id=99))", str(store.path)], check=True)
    assert len(store.path.read_text().splitlines()) == N_THREADS + 1


def test_a_writer_through_a_symlink_meets_the_lock(tmp_path):
    """The lock file comes from the data file's real path: a store opened through a symlink (to the file or to
    its folder) waits for the same lock as one opened by the real path."""
    real = tmp_path / "real" / "res.jsonl"
    real.parent.mkdir()
    (tmp_path / "link.jsonl").symlink_to(real)
    (tmp_path / "dir_link").symlink_to(real.parent, target_is_directory=True)
    with holding(real) as holder:
        for other in (tmp_path / "link.jsonl", tmp_path / "dir_link" / "res.jsonl"):
            store = ResultStore(other, ("id",))
            assert store.lock_path == real.with_name("res.jsonl.lock")
            with pytest.raises(StoreLocked, match=rf"being written by another process \(pid {holder.pid} "):
                store.append(dict(id=1))
    assert real.read_text() == '{"id": 0}\n'


def test_stores_of_one_process_through_a_symlink_share_lock_and_keys(tmp_path):
    real, link = tmp_path / "res.jsonl", tmp_path / "link.jsonl"
    link.symlink_to(real)
    a, b = ResultStore(real, ("id",)), ResultStore(link, ("id",))
    a.append(dict(id=1))
    with pytest.raises(ValueError, match="already stored"):
        b.append(dict(id=1))
    b.append(dict(id=2))
    a.close()
    b.close()
    assert real.read_text().splitlines() == ['{"id": 1}', '{"id": 2}']


def test_setting_bad_lines_aside_through_a_symlink_keeps_the_link(tmp_path):
    real, link = tmp_path / "res.jsonl", tmp_path / "link.jsonl"
    real.write_text('{"id": 1}\ngarbage\n')
    link.symlink_to(real)
    with pytest.warns(RuntimeWarning, match="not rows"):
        store = ResultStore(link, ("id",))
    with pytest.warns(RuntimeWarning, match="moved them to"):
        store.append(dict(id=2))
    assert link.is_symlink() and real.read_text() == '{"id": 1}\n{"id": 2}\n'
    assert (tmp_path / "res.jsonl.rejected").read_text() == "garbage\n"
