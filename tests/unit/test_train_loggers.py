"""raypdm.train.loggers (backend checks, TensorBoard written and read back), the train job's `log_to`
validation, the plain training lines of raypdm.ui, and the run labels of raypdm.pipelines.train."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from pydantic import ValidationError

from raypdm.pipelines.train import TrainJobConfig, _labels
from raypdm.train import loggers as loggers_mod
from raypdm.train.loggers import BACKENDS, TrainLoggers, TrainLogging, check_backends, open_loggers
from raypdm.ui import TrainProgressView, train_line

_real_find_spec = importlib.util.find_spec


def _without(*missing: str):
    def find_spec(name, *args, **kwargs):
        if name in missing:
            return None
        return _real_find_spec(name, *args, **kwargs)

    return find_spec


# --------------------------------------------------------------------------- check_backends


def test_check_backends_drops_repeats_and_keeps_order():
    assert check_backends(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert check_backends([]) == []


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError) as info:
        check_backends(["tensorboard", "nope"])
    message = str(info.value)
    assert "'nope'" in message
    for name in BACKENDS:
        assert name in message


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("raypdm.train.loggers.importlib.util.find_spec", _without("wandb"))
    with pytest.raises(ValueError) as info:
        check_backends(["tensorboard", "wandb"])
    message = str(info.value)
    assert "wandb" in message and "pip install" in message
    assert "not installed" in message


def test_missing_tensorboard_is_reported_too(monkeypatch):
    monkeypatch.setattr(loggers_mod.importlib.util, "find_spec", _without("tensorboard"))
    with pytest.raises(ValueError, match=r"tensorboard.*pip install 'tensorboard"):
        check_backends(["tensorboard"])


# --------------------------------------------------------------------------- TrainLogging


def test_wants_images_every_n_and_at_the_end():
    logging = TrainLogging(validation_every=3, validation_images=2)
    assert [s for s in range(1, 11) if logging.wants_images(s, 10)] == [3, 6, 9, 10]


def test_wants_images_never_when_off():
    assert not any(TrainLogging(validation_every=0).wants_images(s, 5) for s in range(1, 6))
    assert not any(TrainLogging(validation_every=1, validation_images=0).wants_images(s, 5) for s in range(1, 6))


def test_train_logging_validates():
    assert TrainLogging().log_to == ["tensorboard"]
    with pytest.raises(ValidationError, match="log_to"):
        TrainLogging(log_to=["nope"])
    with pytest.raises(ValidationError, match="validation_images"):
        TrainLogging(validation_images=17)


# --------------------------------------------------------------------------- open_loggers


def test_tensorboard_scalars_and_images_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "id000"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
    with open_loggers(TrainLogging(log_to=["tensorboard"]), output=str(out), label="id000", config={}) as loggers:
        assert isinstance(loggers, TrainLoggers) and len(loggers.backends) == 1
        loggers.scalars(1, {"train/loss": 0.5, "train/lr": 1e-4})
        loggers.scalars(2, {"train/loss": 0.25, "train/lr": 1e-4})
        loggers.images(2, "validation", images, caption="a photo of sks person")
        loggers.images(2, "empty", [])  # nothing to log: no tag
    assert (out / "tensorboard").is_dir()
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([0.5, 0.25])
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-4, 1e-4])
    assert "validation" in tags["images"]
    assert not any(tag.startswith("empty") for tag in tags["images"])
    shots = acc.Images("validation")
    assert [shot.step for shot in shots] == [2]
    assert (shots[0].width, shots[0].height) == (16, 8)  # the two 8x8 images side by side in one grid
    assert any(tag.startswith("validation/prompt") for tag in tags["tensors"])


def test_mlflow_run_has_the_params_metrics_and_images(tmp_path):
    """A local MLflow store (SQLite beside the runs, what a local output gets by default): one run per
    identity, the config as params, one metric per logged step, validation images as artifacts."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from raypdm.train.loggers import TrackingConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logs = TrainLogging(log_to=["mlflow"], tracking=TrackingConfig(mlflow_tracking_uri=uri, mlflow_experiment="t"))
    config = {"identity": "id000", "output": str(tmp_path / "id000"), "train": {"steps": 2, "lr": 5e-6}}
    image = np.full((8, 8, 3), 200, np.uint8)
    with open_loggers(logs, output=str(tmp_path / "id000"), label="id000", config=config) as loggers:
        loggers.scalars(1, {"train/loss": 0.5})
        loggers.scalars(2, {"train/loss": 0.25, "val/loss": 0.3})
        loggers.images(2, "validation", [image])
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("t")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "id000" and run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "2" and float(run.data.params["train.lr"]) == 5e-6
    assert run.data.tags["raypdm.identity"] == "id000"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.25)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val.loss")] == [0.3]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]  # log_image's folder
    assert any("validation_0" in a for a in artifacts), artifacts
    assert (tmp_path / "mlartifacts").is_dir()  # beside the store, not in the worker's working directory


def test_wandb_offline_run_is_written_under_the_output(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from raypdm.train.loggers import TrackingConfig

    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = TrainLogging(log_to=["wandb"], tracking=TrackingConfig(wandb_mode="offline", wandb_project="raypdm-test"))
    out = tmp_path / "id000"
    with open_loggers(logs, output=str(out), label="id000", config={"identity": "id000"}) as loggers:
        loggers.scalars(1, {"train/loss": 0.5})
        loggers.images(1, "validation", [np.zeros((8, 8, 3), np.uint8)])
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    assert list(runs[0].glob("*.wandb"))  # the run's records, for `wandb sync` later


def test_no_logging_config_means_no_backends(tmp_path):
    with open_loggers(None, output=str(tmp_path / "id001"), label="id001", config={}) as loggers:
        assert isinstance(loggers, TrainLoggers)
        assert loggers.backends == []
        loggers.scalars(1, {"train/loss": 1.0})  # no-ops
        loggers.images(1, "validation", [np.zeros((8, 8, 3), np.uint8)])
        loggers.sync()
    assert not (tmp_path / "id001").exists()


def test_empty_log_to_logs_nothing(tmp_path):
    with open_loggers(TrainLogging(log_to=[]), output=str(tmp_path / "id002"), label="x", config={}) as loggers:
        assert loggers.backends == []
    assert not (tmp_path / "id002").exists()


def test_backends_are_closed_even_when_the_run_fails(tmp_path, monkeypatch):
    events = []

    class FakeTensorBoard:
        def __init__(self, output):
            events.append(("open", output))

        def scalars(self, step, values):
            events.append(("scalars", step))

        def close(self):
            events.append(("close",))
            raise RuntimeError("tracker down")  # must not hide the run's own error

    monkeypatch.setattr(loggers_mod, "_TensorBoard", FakeTensorBoard)
    with pytest.raises(ZeroDivisionError):
        with open_loggers(TrainLogging(), output=str(tmp_path), label="x", config={}) as opened:
            opened.scalars(1, {"train/loss": 1.0})
            1 / 0  # noqa: B018
    assert events == [("open", str(tmp_path)), ("scalars", 1), ("close",)]


# --------------------------------------------------------------------------- the job config


def test_job_config_rejects_an_unknown_logger():
    with pytest.raises(ValidationError) as info:
        TrainJobConfig(data="/d", output="/o", log_to=["nope"])
    assert "log_to" in str(info.value)


def test_job_config_rejects_a_logger_that_is_not_installed(monkeypatch):
    monkeypatch.setattr("raypdm.train.loggers.importlib.util.find_spec", _without("wandb"))
    with pytest.raises(ValidationError) as info:
        TrainJobConfig(data="/d", output="/o", log_to=["wandb"])
    message = str(info.value)
    assert "log_to" in message and "pip install" in message and "wandb" in message


def test_job_config_dedups_log_to():
    cfg = TrainJobConfig(data="/d", output="/o", log_to=["tensorboard", "tensorboard"])
    assert cfg.log_to == ["tensorboard"]
    logging = cfg.logging_config("id000")
    assert logging.log_to == ["tensorboard"] and logging.label == "id000"


def test_job_config_mlflow_on_a_cloud_output_needs_a_tracking_uri(monkeypatch):
    def find_spec(name, *args, **kwargs):  # pretend mlflow is installed
        return object() if name == "mlflow" else _real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr("raypdm.train.loggers.importlib.util.find_spec", find_spec)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValidationError, match="mlflow_tracking_uri"):
        TrainJobConfig(data="/d", output="memory://bucket/runs", log_to=["mlflow"])
    cfg = TrainJobConfig(data="/d", output="/runs", log_to=["mlflow"])
    assert cfg.logging_config("id000").tracking.mlflow_tracking_uri == "sqlite:////runs/mlflow.db"


# --------------------------------------------------------------------------- plain training lines


def test_train_line_while_training():
    record = {"step": 5, "total": 10, "loss": 0.1234, "s_per_step": 0.5, "eta_s": 2.5, "phase": "training"}
    line = train_line("id000", record, 10)
    assert "5/10" in line
    assert "loss 0.1234" in line
    assert "0.50 s/step" in line
    assert "ETA" in line and "0:02" in line
    assert "attempt" not in line


def test_train_line_in_another_phase():
    line = train_line("id000", {"step": 0, "phase": "loading model"}, 10)
    assert "loss -" in line and "- s/step" in line
    assert "loading model" in line
    assert "ETA" not in line
    assert "0/10" in line  # the total falls back to the argument


def test_train_line_shows_the_attempt_and_pads_the_label():
    record = {"step": 3, "total": 9, "loss": 1.0, "phase": "training", "attempt": 2, "eta_s": 3725}
    line = train_line("a", record, 9, width=5)
    assert "attempt 2" in line
    assert line.startswith("a    ")
    assert "ETA 1:02:05" in line
    assert train_line("a", None, 4).split() == ["a", "0/4", "loss", "-", "-", "s/step", "waiting"]


def test_plain_view_prints_on_phase_changes_only():
    lines: list[str] = []
    view = TrainProgressView(["a", "b"], {"a": 100, "b": 100}, log=lines.append)
    assert view.live_mode is False  # stderr is not a terminal under pytest
    with view:
        view.update({"a": {"label": "a", "phase": "loading model"}, "b": {"label": "b", "phase": "loading model"}})
        assert len(lines) == 2
        assert lines[0].startswith("a") and lines[1].startswith("b")
        assert all("loading model" in line for line in lines)
        view.update({"a": {"label": "a", "phase": "loading model"}, "b": {"label": "b", "phase": "loading model"}})
        assert len(lines) == 2  # nothing changed: no new lines
        view.update({"a": {"label": "a", "phase": "training", "step": 1, "total": 100, "loss": 0.5},
                     "b": {"label": "b", "phase": "loading model"}})
        assert len(lines) == 3
        assert lines[2].startswith("a") and "1/100" in lines[2] and "loss 0.5000" in lines[2]
        view.update({"a": {"label": "a", "phase": "training", "step": 2, "total": 100, "loss": 0.4},
                     "b": {"label": "b", "phase": "loading model"}})
        assert len(lines) == 3  # still training, within the same 10%: no heartbeat yet


def test_plain_view_prints_a_line_per_ten_percent_while_training():
    lines: list[str] = []
    view = TrainProgressView(["a"], {"a": 1000}, log=lines.append)
    for step in range(1, 1001):
        view.update({"a": {"phase": "training", "step": step, "total": 1000}})
    # the first record, then one line each time the steps cross another 10% (100, 200, ..., 1000)
    assert len(lines) == 11, lines
    assert [line.split()[1] for line in lines[1:]] == [f"{k * 100}/1000" for k in range(1, 11)]
    view.update({"a": {"phase": "exporting", "step": 1000, "total": 1000}})
    view.update({"a": {"phase": "exporting", "step": 1000, "total": 1000}})
    assert len(lines) == 12 and "exporting" in lines[-1]  # outside training: only changes


def test_progress_goes_to_stderr_and_none_without_progress(capsys):
    from raypdm.ui import set_progress

    view = TrainProgressView(["a"], {"a": 10})
    view.update({"a": {"phase": "loading model"}})
    out = capsys.readouterr()
    assert "loading model" in out.err and out.out == ""
    quiet = TrainProgressView(["a"], {"a": 10}, enabled=False)
    quiet.update({"a": {"phase": "training", "step": 5}})
    set_progress(False)  # the CLI's --no-progress reaches views that were not told
    try:
        TrainProgressView(["a"], {"a": 10}).update({"a": {"phase": "done", "step": 10}})
    finally:
        set_progress(True)
    assert capsys.readouterr() == ("", "")


def test_plain_view_skips_labels_without_records():
    lines: list[str] = []
    view = TrainProgressView(["a", "b"], {"a": 1, "b": 1}, log=lines.append)
    view.update({"b": {"phase": "done", "step": 1}})
    assert len(lines) == 1 and lines[0].startswith("b") and "done" in lines[0]


# --------------------------------------------------------------------------- run labels


def test_labels_drop_the_shared_prefix():
    jobs = [{"job": {"output": "/r/models/id000"}}, {"job": {"output": "/r/models/id001"}}]
    assert _labels(jobs) == ["id000", "id001"]


def test_label_of_a_single_job_is_its_last_part():
    assert _labels([{"job": {"output": "/r/models/id000/"}}]) == ["id000"]


def test_labels_of_a_red_team_matrix():
    jobs = [{"job": {"output": "/r/none/cdl/seed0/a"}}, {"job": {"output": "/r/codesr/cdl/seed0/a"}}]
    assert _labels(jobs) == ["none/cdl/seed0/a", "codesr/cdl/seed0/a"]


def test_labels_keep_at_least_the_last_part():
    jobs = [{"job": {"output": "/r/x"}}, {"job": {"output": "/r/x/y"}}]
    labels = _labels(jobs)
    assert labels == ["x", "x/y"]
    assert len(set(labels)) == len(labels)


def test_stage_progress_names_the_stage_on_stdout_and_counts_on_stderr(capsys):
    from raypdm.ui import set_progress, stage_progress

    with stage_progress("purify: jpeg") as progress:
        for done in range(0, 41, 4):
            progress(done, 40)
    out = capsys.readouterr()
    assert out.out.strip() == "purify: jpeg"
    lines = out.err.strip().splitlines()
    assert lines[0].strip() == "0/40 images (0%)" and lines[-1].strip() == "40/40 images (100%)"
    assert len(lines) == 11  # one per 10%
    with stage_progress("purify: jpeg", enabled=False) as progress:
        assert progress is None
    set_progress(False)
    try:
        with stage_progress("purify: jpeg") as progress:
            assert progress is None
    finally:
        set_progress(True)
    out = capsys.readouterr()
    assert out.out.count("purify: jpeg") == 2 and out.err == ""
