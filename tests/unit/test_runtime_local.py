"""`init_ray` on one machine: the settings an embedded cluster gets, without starting Ray."""

from __future__ import annotations

import pytest

import raypdm.runtime as runtime


@pytest.fixture
def fake_ray(monkeypatch):
    import os

    import ray

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(runtime, "_configure_data", lambda quiet: None)
    monkeypatch.setattr(runtime, "_filter_native_stderr", lambda: None)
    monkeypatch.setattr(runtime, "ray_resources", lambda: {"CPU": 2.0})
    before = {key: os.environ.pop(key, None) for key in runtime._LOCAL_TRAIN_ENV}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield calls
    for key, value in before.items():  # init_ray sets them in os.environ itself: put back what was there
        os.environ.pop(key, None)
        if value is not None:
            os.environ[key] = value


def test_a_local_cluster_runs_train_without_a_preemption_watcher_and_polls_fast(fake_ray, monkeypatch):
    import os

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's value wins
    runtime.init_ray(num_cpus=2)
    assert fake_ray and "address" not in fake_ray[0]
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_a_running_cluster_keeps_its_train_settings(fake_ray, monkeypatch):
    import os

    monkeypatch.delenv("RAYPDM_NO_VERIFY", raising=False)
    runtime.init_ray(address="ray://head:10001")
    assert fake_ray[0]["address"] == "ray://head:10001" and "runtime_env" not in fake_ray[0]
    assert all(key not in os.environ for key in runtime._LOCAL_TRAIN_ENV)
