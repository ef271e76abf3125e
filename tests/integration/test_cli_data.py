"""`raypdm data ...` and `raypdm purify` through the real CLI entry point, on a local Ray."""

import pytest
from click.testing import CliRunner

from raypdm.cli import cli

pytestmark = pytest.mark.ray


def test_make_synthetic_then_check_ok(ray_local, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "make-synthetic", "--out", str(tmp_path), "--num-identities", "2", "--images", "2",
                              "--size", "32", "--real-photos"])
    assert res.exit_code == 0, res.output
    assert "wrote 18 images" in res.output
    # A run writing the root right now: `data check` is read-only, takes no lock, and says so.
    from raypdm.data.lock import LOCK_NAME, OutputLock

    with OutputLock(str(tmp_path), run_id="writer-run", command="raypdm purify"):
        res = runner.invoke(cli, ["data", "check", str(tmp_path)], terminal_width=200)
        assert (tmp_path / LOCK_NAME).exists()
    assert res.exit_code == 0, res.output
    assert "astronaut" in res.output and "ok" in res.output
    assert "being written right now by run writer-run" in res.output and "hidden" not in res.output


def test_check_lists_every_bad_file_and_fails(ray_local, tmp_path):
    runner = CliRunner()
    runner.invoke(cli, ["data", "make-synthetic", "--out", str(tmp_path), "--num-identities", "1", "--images", "2", "--size", "32"])
    (tmp_path / "id000" / "set_A" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "id000" / "set_Q").mkdir()
    res = runner.invoke(cli, ["data", "check", str(tmp_path)], terminal_width=200)
    assert res.exit_code == 1
    assert "broken.png" in res.output and "set_Q" in res.output


def test_check_missing_root_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(cli, ["data", "check", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_purify_cli_with_config_file_and_overrides(ray_local, tmp_path):
    runner = CliRunner()
    runner.invoke(cli, ["data", "make-synthetic", "--out", str(tmp_path / "d"), "--num-identities", "1", "--images", "2", "--size", "32"])
    cfg = tmp_path / "purify.yaml"
    cfg.write_text(f"input: {tmp_path / 'd'}\noutput: {tmp_path / 'o'}\npurifier: jpeg\n")
    res = runner.invoke(cli, ["purify", "--config", str(cfg), "--set", "options.jpeg.quality=60", "--lpips", "random",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    saved = (tmp_path / "o" / "config.yaml").read_text()
    assert "quality: 60" in saved
    assert "ssim" in __import__("pyarrow.parquet", fromlist=["x"]).read_table(tmp_path / "o" / "manifest.parquet").column_names
    res = runner.invoke(cli, ["purify", "--config", str(cfg), "--set", "options.jpeg.qualty=60"])
    assert res.exit_code != 0 and "qualty" in res.output
