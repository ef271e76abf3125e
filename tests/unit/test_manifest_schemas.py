"""Declared manifest schemas and run ids (raypdm/data/schemas.py, raypdm/data/manifest.py)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from raypdm.data.manifest import Manifest, conform, current_run_id, run_scope
from raypdm.data.schemas import check_manifest, kind_of


def _rows(**extra):
    base = {"identity": "id000", "split": "set_A", "name": "a.png", "src_uri": "/in/a.png", "stage": "evaluate",
            "config_hash": "h"}
    return [{**base, "name": f"{i}.png", **{k: v[i] for k, v in extra.items()}} for i in range(len(extra["ims"]))]


def test_flags_become_bools_with_nulls_and_the_kind_is_in_the_metadata():
    table = conform(pa.Table.from_pylist(_rows(ims=[0.5, 0.1, math.nan], face_found=[1.0, 0.0, math.nan],
                                               method=["jpeg"] * 3)), "evaluate")
    assert table.schema.field("face_found").type == pa.bool_()
    assert table.column("face_found").to_pylist() == [True, False, None]
    assert table.schema.field("error").type == pa.string() and table.column("error").null_count == 3
    assert kind_of(table.schema) == "evaluate"
    assert check_manifest(table.schema, labels=("method",)) == []
    assert check_manifest(table.schema) == ["method: not declared for evaluate manifests"]


def test_check_manifest_names_wrong_types_and_unknown_kinds():
    table = conform(pa.Table.from_pylist(_rows(ims=[0.5])), "evaluate")
    wrong = table.set_column(table.column_names.index("ims"), "ims", pa.array(["x"]))
    assert check_manifest(wrong.schema) == ["ims: string != double"]
    assert "unknown manifest kind None" in check_manifest(conform(pa.Table.from_pylist(_rows(ims=[0.5]))).schema)[0]


def test_a_written_manifest_keeps_its_kind_and_types_through_compaction(tmp_path):
    with run_scope() as run_id:
        m = Manifest(str(tmp_path), kind="evaluate")
        m.append(_rows(ims=[0.5, 0.2], is_noise=[0.0, 1.0]))
        m.append(_rows(ims=[0.7], is_noise=[1.0]))
        m.compact()
    schema = pq.read_schema(tmp_path / "manifest.parquet")
    assert kind_of(schema) == "evaluate" and schema.field("is_noise").type == pa.bool_()
    assert check_manifest(schema) == []
    table = pq.read_table(tmp_path / "manifest.parquet")
    assert set(table.column("run_id").to_pylist()) == {run_id}
    assert Manifest(str(tmp_path)).read().schema.field("is_noise").type == pa.bool_()  # a reader needs no kind


def test_run_scope_is_one_id_per_command_and_outer_scopes_win(tmp_path):
    from raypdm.config import save_resolved_config
    from raypdm.pipelines.purify import PurifyConfig

    assert current_run_id() is None
    with run_scope() as outer:
        with run_scope() as inner:
            assert inner == outer == current_run_id()
        assert Manifest(str(tmp_path)).run_id == outer
        cfg = PurifyConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
        path = save_resolved_config(cfg, cfg.output)
    assert current_run_id() is None
    text = open(path).read()
    assert text.splitlines()[0] == f"# run_id: {outer}  (the manifest rows this run wrote carry the same id)"
    assert PurifyConfig(**yaml.safe_load(text)) == cfg  # the header is a comment: the file still loads
    with run_scope() as later:
        assert later > outer  # sortable: a later run's parts are read after an earlier run's
