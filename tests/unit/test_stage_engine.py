"""The stage engine's pieces that need no cluster: one placement rule for every stage's actors, worker
columns declared by the manifest kind, and the commit order of StageOutput."""

import pyarrow as pa
import pytest

from raypdm.data.commit import staged_uri, write_staged
from raypdm.data.manifest import Manifest
from raypdm.pipelines import engine
from raypdm.pipelines.engine import StageOutput, placement, row_columns
from raypdm.pipelines.stage import StageSummary


@pytest.fixture
def cluster(monkeypatch):
    import ray

    def make(cpus: float, gpus: float = 0.0, nodes: int = 1):
        monkeypatch.setattr("raypdm.runtime.init_ray", lambda *a, **k: None)  # a described cluster, no Ray
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": cpus * nodes, "GPU": gpus * nodes})
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": cpus}}] * nodes)

    return make


def test_gpu_actors_take_their_gpus_and_one_cpu(cluster):
    cluster(cpus=16, gpus=8)
    where = placement(actors=4, gpus_per_worker=0.5)
    assert where.remote_args == {"num_cpus": 1.0, "num_gpus": 0.5} and where.threads is None
    # a stage that asks for no GPU (a light transform) gets none even on a GPU cluster
    assert placement(actors=4, uses_gpu=False).num_gpus == 0.0


def test_cpu_actors_leave_room_for_read_and_write_tasks(cluster):
    cluster(cpus=2)
    where = placement(actors=2)
    # 2 CPUs - 1 reserved for Ray Data's read/write tasks, shared by 2 actors; one torch thread each
    assert where.remote_args == {"num_cpus": 0.5, "num_gpus": 0.0} and where.threads == 1
    lone = placement(actors=1, reserved_cpus=0.25)
    assert lone.num_cpus == pytest.approx(0.75) and lone.threads == 2  # a lone actor uses every core
    assert placement(actors=1000).num_cpus == 0.01  # never zero: Ray would place it nowhere
    # an explicit share wins (per-identity protections' cpus_per_identity)
    assert placement(actors=3, cpus_per_worker=0.5).num_cpus == 0.5


def test_threads_follow_the_smallest_node(cluster):
    cluster(cpus=8, nodes=3)
    assert placement(actors=2).threads == 4


def test_row_columns_cover_the_kind_and_refuse_undeclared_columns():
    cols = row_columns([{"identity": "a", "seed": 3}, {"identity": "b", "prompt": "p"}], "sample")
    assert list(cols["seed"]) == [3, None] and list(cols["prompt"]) == [None, "p"]
    assert "run_id" in cols and "negative_prompt" in cols  # every base and declared column, always
    with pytest.raises(ValueError, match="'ims'.*not declared for sample"):
        row_columns([{"identity": "a", "ims": 0.5}], "sample")


def test_commit_makes_rows_durable_before_the_file_gets_its_name(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    summary = StageSummary(stage="t", output=out)
    output = StageOutput(out, "purify", summary)
    output.open()
    final = f"{out}/id0/set_A/a.png"
    write_staged(final, b"png", output.run_id, root=out)
    seen = []
    real_append = output.manifest.append

    def append(rows):  # when the rows are written, the file must still be under its staged name
        seen.append((tmp_path / "out/id0/set_A/a.png").exists())
        return real_append(rows)

    monkeypatch.setattr(output.manifest, "append", append)
    rows = pa.Table.from_pylist([
        {"identity": "id0", "split": "set_A", "name": "a.png", "uri": final, "output_bytes": 3, "error": None},
        {"identity": "id0", "split": "set_A", "name": "b.png", "error": "bad", "error_kind": "input"},
    ])
    output.commit(rows)
    output.close()
    assert seen == [False]
    assert (tmp_path / "out/id0/set_A/a.png").read_bytes() == b"png"
    assert not (tmp_path / staged_uri("out/id0/set_A/a.png", output.run_id)).exists()
    assert summary.processed == 1 and summary.errors == 1
    assert Manifest(out).read().column("run_id").to_pylist() == [output.run_id] * 2


def test_rows_only_stages_publish_nothing(tmp_path, monkeypatch):
    out = str(tmp_path / "scores")
    called = []
    monkeypatch.setattr("raypdm.data.commit.publish", lambda *a: called.append(a))
    output = StageOutput(out, "evaluate", StageSummary(stage="evaluate", output=out), files=False)
    output.open()
    output.commit(pa.Table.from_pylist([{"identity": "i", "split": "s", "name": "n", "uri": "/data/i/s/n.png"}]))
    output.close()
    assert called == [] and Manifest(out).read().num_rows == 1


def test_the_engine_is_the_only_place_that_builds_actor_pools():
    """Every stage goes through pipelines/engine.py: no other module wires its own Ray Data pool."""
    import pathlib

    root = pathlib.Path(engine.__file__).parents[1]
    wiring = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                    if "ActorPoolStrategy(" in p.read_text() and p.name != "engine.py")
    assert wiring == []
