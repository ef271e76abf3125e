"""One writer per output root (raypdm/data/lock.py): refused while the holder lives, taken over once it is
gone, exactly one winner among racing processes, nested roots, the heartbeat."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from raypdm.data.lock import (
    LOCK_NAME,
    Holder,
    OutputLock,
    OutputLockedError,
    hold_output,
    hold_outputs,
    outputs_of,
)


def _plant(root, **fields) -> dict:
    """A lock file as another run would have written it."""
    now = time.time()
    data = {"run_id": "other-run", "host": socket.gethostname(), "pid": os.getpid(), "started": now - 60,
            "heartbeat": now, "command": "raypdm purify --purifier jpeg", "user": "someone", "pid_started": None}
    data.update(fields)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK_NAME), "w") as f:
        json.dump(data, f)
    return data


@pytest.fixture
def sleeper():
    """A live process that is not this one: the holder of a planted lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_lock_holds_its_fields_while_held_and_is_gone_after(tmp_path):
    root = str(tmp_path / "out")
    with OutputLock(root, run_id="run-1", command="raypdm purify") as lock:
        data = json.loads(open(os.path.join(root, LOCK_NAME)).read())
        assert data["run_id"] == "run-1" and data["pid"] == os.getpid()
        assert data["host"] == socket.gethostname() and data["command"] == "raypdm purify"
        assert data["heartbeat"] >= data["started"] and "started_utc" in data
        assert lock.took_over is None
    assert not os.path.exists(root)  # no lock, no temporary files, and the empty folder it made is gone


def test_a_live_holder_refuses_a_second_run_naming_it(tmp_path, sleeper):
    root = str(tmp_path / "out")
    _plant(root, pid=sleeper.pid)
    with pytest.raises(OutputLockedError) as err:
        OutputLock(root, run_id="mine").acquire()
    msg = str(err.value)
    assert f"pid {sleeper.pid}" in msg and "other-run" in msg and "raypdm purify --purifier jpeg" in msg
    assert socket.gethostname() in msg and "started" in msg
    assert json.loads(open(os.path.join(root, LOCK_NAME)).read())["run_id"] == "other-run"  # untouched


def test_a_dead_holder_on_this_host_is_taken_over_with_a_message(tmp_path, sleeper):
    root = str(tmp_path / "out")
    _plant(root, pid=sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    said = []
    with OutputLock(root, run_id="mine", log=said.append) as lock:
        assert lock.took_over is not None and lock.took_over.run_id == "other-run"
        assert json.loads(open(os.path.join(root, LOCK_NAME)).read())["run_id"] == "mine"
    assert len(said) == 1 and "taking over" in said[0] and "is gone" in said[0]
    assert not os.path.exists(os.path.join(root, LOCK_NAME))


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path, sleeper):
    root = str(tmp_path / "out")
    _plant(root, pid=sleeper.pid, pid_started=12345.0)  # the pid lives, but it is another process now
    with OutputLock(root, run_id="mine", log=lambda m: None) as lock:
        assert lock.took_over is not None


def test_a_holder_on_another_host_is_stale_only_after_its_heartbeat_limit(tmp_path):
    root = str(tmp_path / "out")
    _plant(root, host="gpu-node-7", pid=1, heartbeat=time.time() - 5)
    with pytest.raises(OutputLockedError, match="gpu-node-7"):
        OutputLock(root, stale_after=60).acquire()
    _plant(root, host="gpu-node-7", pid=1, heartbeat=time.time() - 120)
    said = []
    with OutputLock(root, stale_after=60, log=said.append) as lock:
        assert lock.took_over.host == "gpu-node-7"
    assert "heartbeat was 120 s ago (limit 60 s" in said[0]


def test_the_stale_limit_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPDM_LOCK_STALE_S", "7")
    assert OutputLock(str(tmp_path)).stale_after == 7
    monkeypatch.setenv("RAYPDM_LOCK_STALE_S", "soon")
    with pytest.raises(ValueError, match="RAYPDM_LOCK_STALE_S"):
        OutputLock(str(tmp_path))


def test_an_unreadable_lock_counts_as_held_until_it_is_old(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / LOCK_NAME).write_text("{torn")
    with pytest.raises(OutputLockedError, match="unreadable"):
        OutputLock(str(root), stale_after=60).acquire()
    old = time.time() - 600
    os.utime(root / LOCK_NAME, (old, old))
    with OutputLock(str(root), stale_after=60, log=lambda m: None) as lock:
        assert lock.took_over is not None


def test_the_heartbeat_advances_and_notices_a_takeover(tmp_path):
    root = str(tmp_path / "out")
    said = []
    lock = OutputLock(root, run_id="mine", heartbeat_every=0.05, log=said.append).acquire()
    first = json.loads(open(os.path.join(root, LOCK_NAME)).read())["heartbeat"]
    time.sleep(0.3)
    assert json.loads(open(os.path.join(root, LOCK_NAME)).read())["heartbeat"] > first
    _plant(root, run_id="thief")  # another run took it over (this one looked stale to it)
    time.sleep(0.3)
    assert lock.lost_to is not None and lock.lost_to.run_id == "thief"
    assert any("no longer this run's" in m for m in said)
    lock.release()
    assert json.loads(open(os.path.join(root, LOCK_NAME)).read())["run_id"] == "thief"  # not ours to remove


def test_a_root_inside_a_live_runs_root_is_refused(tmp_path, sleeper):
    _plant(str(tmp_path / "run"), pid=sleeper.pid)
    with pytest.raises(OutputLockedError, match="lies inside"):
        OutputLock(str(tmp_path / "run" / "purified")).acquire()
    # a sibling is not inside it
    with OutputLock(str(tmp_path / "elsewhere"), log=lambda m: None):
        pass


def test_nested_roots_in_one_process_take_no_second_lock(tmp_path):
    with hold_output(str(tmp_path / "run")) as outer:
        assert outer is not None
        with hold_output(str(tmp_path / "run" / "purified")) as inner:
            assert inner is None
            assert not os.path.exists(tmp_path / "run" / "purified" / LOCK_NAME)
        assert os.path.exists(tmp_path / "run" / LOCK_NAME)
    assert not os.path.exists(tmp_path / "run" / LOCK_NAME)


def test_outputs_of_a_config_or_a_list_of_them():
    class C:
        def __init__(self, output):
            self.output = output

    assert outputs_of(C("/a")) == ["/a"]
    assert outputs_of([C("/a"), C("/b"), C("/a")]) == ["/a", "/b"]
    assert outputs_of(object()) == [] and outputs_of([]) == []


def test_a_lock_on_an_fsspec_store_uses_its_exclusive_create():
    root = "memory://bucket/runs/out"
    with hold_outputs([root]):
        with pytest.raises(OutputLockedError, match="being written by another run"):
            # Same process, but outside the registry: the store's exclusive create refuses it.
            OutputLock(root, run_id="second").acquire()
        with pytest.raises(OutputLockedError, match="lies inside"):
            OutputLock(root + "/purified", run_id="second").acquire()
    import fsspec

    assert not fsspec.filesystem("memory").exists("/bucket/runs/out/" + LOCK_NAME)


def _race(root, barrier, results, stale):
    barrier.wait()
    try:
        lock = OutputLock(root, run_id=f"p{os.getpid()}", log=lambda m: None).acquire()
        results.put("won")
        time.sleep(0.5)  # hold it while the others try
        lock.release()
    except OutputLockedError:
        results.put("refused")


@pytest.mark.parametrize("stale", [False, True], ids=["free root", "stale lock"])
def test_exactly_one_of_racing_processes_wins(tmp_path, stale):
    root = str(tmp_path / "out")
    if stale:
        _plant(root, host="gone-host", pid=1, heartbeat=time.time() - 10_000)
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(root, barrier, results, stale)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not os.path.exists(os.path.join(root, LOCK_NAME))


def test_holder_round_trips_and_describes_itself():
    h = Holder.here("run-9", "raypdm sample")
    back = Holder.from_bytes(h.to_bytes())
    assert back == h
    assert "run run-9" in back.describe() and "raypdm sample" in back.describe()
    assert back.stale_reason(stale_after=60) is None


def test_a_run_that_wrote_nothing_leaves_no_folder_it_made(tmp_path):
    with OutputLock(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()
    with OutputLock(str(tmp_path / "used")):
        (tmp_path / "used" / "manifest.parquet").write_bytes(b"x")
    assert (tmp_path / "used" / "manifest.parquet").exists()
    (tmp_path / "existing").mkdir()
    with OutputLock(str(tmp_path / "existing")):
        pass
    assert (tmp_path / "existing").is_dir()  # not ours to remove


def test_whole_file_writes_under_a_held_root_do_not_follow_a_planted_folder_link(tmp_path):
    from raypdm.data.roots import OutsideRootError
    from raypdm.data.uri import write_bytes

    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "tables").symlink_to(elsewhere, target_is_directory=True)
    with hold_output(str(root)):
        write_bytes(str(root / "summary.md"), b"ok")  # inside: written
        with pytest.raises(OutsideRootError, match="outside the output root"):
            write_bytes(str(root / "tables" / "table1.md"), b"x")
    # A worker process holds no lock: it names the root itself.
    with pytest.raises(OutsideRootError):
        write_bytes(str(root / "tables" / "t.parquet"), b"x", root=str(root))
    assert list(elsewhere.iterdir()) == [] and (root / "summary.md").read_bytes() == b"ok"


def test_a_bad_stale_limit_is_one_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    from raypdm.cli.runner import JobAbort, run_job
    from raypdm.data.synthetic import make_synthetic

    make_synthetic(str(tmp_path / "d"), identities=1, images=1, size=32, splits=("set_A",))
    monkeypatch.setenv("RAYPDM_LOCK_STALE_S", "soon")
    with pytest.raises(JobAbort, match="RAYPDM_LOCK_STALE_S='soon'"):
        run_job("purify", {"input": str(tmp_path / "d"), "output": str(tmp_path / "o"), "purifier": "jpeg",
                           "lpips_backbone": "random"})
    assert not (tmp_path / "o").exists()


def test_the_purifier_bench_names_an_unknown_purifier_in_its_config():
    from raypdm.bench.purifiers import PurifierBenchConfig

    with pytest.raises(ValueError, match="(?s)purifiers.*unknown purifier 'nope'"):
        PurifierBenchConfig(output="/tmp/b", purifiers=["jpeg", "nope"])
    assert PurifierBenchConfig(output="/tmp/b", images=64).images == [64]
