import pyarrow as pa

from raypdm.data.manifest import MANIFEST_COLUMNS, Manifest, row_key


def _row(name, sha="s1", cfg="c1", error=None, kind=None, **extra):
    return {"identity": "id", "split": "set_A", "name": name, "src_uri": f"/in/{name}", "uri": None if error else f"/o/{name}",
            "input_sha256": sha, "output_sha256": None if error else "o", "stage": "jpeg", "config_hash": cfg,
            "seconds": 0.1, "error": error, "error_kind": kind, **extra}


def test_schema_and_extra_columns(tmp_path):
    m = Manifest(str(tmp_path))
    m.append([_row("a.png", lpips=0.1), _row("b.png", error="bad", kind="input", lpips=None)])
    table = m.compact()
    assert table.column_names[: len(MANIFEST_COLUMNS)] == MANIFEST_COLUMNS
    assert "lpips" in table.column_names
    assert table.schema.field("seconds").type == pa.float64()
    assert (tmp_path / "manifest.parquet").exists() and not list((tmp_path / "_manifest_parts").glob("*"))


def test_done_keys_skip_input_errors_but_retry_runtime_errors(tmp_path):
    m = Manifest(str(tmp_path))
    m.append([_row("a.png"), _row("b.png", error="corrupt", kind="input"), _row("c.png", error="oom", kind="runtime")])
    done = m.done_keys()
    assert row_key("id", "set_A", "a.png", "s1", "c1") in done
    assert row_key("id", "set_A", "b.png", "s1", "c1") in done
    assert row_key("id", "set_A", "c.png", "s1", "c1") not in done


def test_one_row_per_location_and_errors_never_replace_success(tmp_path):
    m = Manifest(str(tmp_path))
    m.append([_row("a.png"), _row("c.png", error="oom", kind="runtime")])
    m2 = Manifest(str(tmp_path))
    m2.append([_row("a.png", error="later failure", kind="runtime"), _row("c.png")])  # retry fixed c
    m2.append([_row("b.png", sha="s1"), _row("b.png", sha="s2")])  # b changed: newer key wins
    table = m2.compact().to_pylist()
    by_name = {r["name"]: r for r in table}
    assert len(table) == 3
    assert by_name["a.png"]["error"] is None
    assert by_name["c.png"]["error"] is None
    assert by_name["b.png"]["input_sha256"] == "s2"


def test_parts_of_an_interrupted_run_are_read(tmp_path):
    m = Manifest(str(tmp_path))
    m.append([_row("a.png")])  # never compacted: the run "died"
    assert Manifest(str(tmp_path)).read().num_rows == 1


def test_manifest_on_a_file_uri(tmp_path):
    m = Manifest(f"file://{tmp_path}")
    m.append([_row("a.png")])
    assert m.compact().num_rows == 1 and (tmp_path / "manifest.parquet").exists()
