"""--storage-options files and the pre-flight store check's local short-cut (no server needed)."""

import json

import fsspec.config
import pytest

from raypdm.data.stores import StoreError, apply_storage_options, check_stores, is_remote, load_storage_options

SECRET = "s3cr3t-value-never-printed"


@pytest.mark.parametrize("text, expected", [
    ("s3: [a, b]\n", "s3 must be a mapping of keyword -> value"),
    ("ftpx:\n  key: k\n", "unknown protocol 'ftpx'"),
    (f"s3:\n  key: {SECRET}\n  secret: [unclosed\n", "not valid YAML (line"),
    ("- just\n- a list\n", "expected a mapping of protocol -> options"),
])
def test_a_bad_file_is_one_line_naming_the_field_never_a_value(tmp_path, text, expected):
    path = tmp_path / "creds.yaml"
    path.write_text(text)
    with pytest.raises(StoreError) as err:
        load_storage_options(str(path))
    assert expected in str(err.value) and str(path) in str(err.value) and SECRET not in str(err.value)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(StoreError, match="cannot read it"):
        load_storage_options(str(tmp_path / "nope.yaml"))


def test_options_become_fsspec_defaults_here_and_in_the_environment_workers_inherit(tmp_path, monkeypatch):
    monkeypatch.setattr(fsspec.config, "conf", {})
    for name in ("FSSPEC_S3", "FSSPEC_S3A"):
        # set, then delete: monkeypatch records the variable's original state only when it touches one that
        # exists, and apply_storage_options below sets it in os.environ, which must not outlive this test
        # (an endpoint of 127.0.0.1:9 leaked into every later subprocess of this xdist worker).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    path = tmp_path / "creds.yaml"
    path.write_text(f"s3:\n  endpoint_url: http://127.0.0.1:9\n  key: k\n  secret: {SECRET}\n")
    apply_storage_options(load_storage_options(str(path)))
    want = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": SECRET}
    assert fsspec.config.conf["s3"] == want and fsspec.config.conf["s3a"] == want
    import os

    assert json.loads(os.environ["FSSPEC_S3"]) == want  # what fsspec reads at import in a Ray worker


def test_local_and_memory_roots_are_not_store_checked(tmp_path):
    assert not is_remote(str(tmp_path)) and not is_remote("memory://x")
    check_stores({"input": str(tmp_path / "missing")}, str(tmp_path / "out"))  # left to the stages: no error
    assert not (tmp_path / "out").exists()  # and nothing written by the check
