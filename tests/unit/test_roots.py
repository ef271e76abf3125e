"""Output roots apart from inputs, and writes that stay inside the output root (raypdm/data/roots.py)."""

from __future__ import annotations

import os

import pytest

from raypdm.data.roots import OutsideRootError, RootOverlapError, check_apart, check_inside


def test_an_output_equal_to_inside_or_containing_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(RootOverlapError, match=r"the output .* is the same folder as the input"):
        check_apart(str(data), {"input": str(data)})
    with pytest.raises(RootOverlapError, match=r"the output .*/data/out is inside the input .*/data"):
        check_apart(str(data / "out"), {"input": str(data)})
    with pytest.raises(RootOverlapError, match=r"contains the reference"):
        check_apart(str(tmp_path / "all"), {"input": str(tmp_path / "elsewhere"), "reference": str(tmp_path / "all" / "d")})
    check_apart(str(tmp_path / "out"), {"input": str(data), "reference": None})  # siblings: fine
    check_apart(str(tmp_path / "data-out"), {"input": str(data)})  # a shared prefix is not nesting


def test_symlinks_and_uris_are_resolved_before_comparing(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(RootOverlapError, match="both resolve to"):
        check_apart(str(link), {"input": str(data)})
    with pytest.raises(RootOverlapError):
        check_apart("s3://bucket/data/out/", {"input": "s3://bucket/data"})
    check_apart("s3://bucket/out", {"input": "s3://bucket/data", "reference": str(data)})


def test_a_smoke_runs_own_inputs_under_its_output_are_allowed(tmp_path):
    check_apart(str(tmp_path / "out"), {"input": str(tmp_path / "out" / "_smoke_data")})


def test_a_planted_folder_symlink_cannot_carry_a_write_outside_the_root(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (out / "bob").mkdir(parents=True)
    elsewhere.mkdir()
    (out / "alice").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutsideRootError, match="outside the output root"):
        check_inside(str(out), str(out / "alice" / "set_A" / "x.png"))
    with pytest.raises(OutsideRootError):
        check_inside(str(out), str(out / "bob" / ".." / ".." / "elsewhere" / "x.png"))
    ok = check_inside(str(out), str(out / "bob" / "set_A" / "x.png"))
    assert ok == os.path.join(os.path.realpath(out / "bob" / "set_A"), "x.png")
    # An output root that is itself a link is the user's choice: writes under it are inside it.
    link_root = tmp_path / "out-link"
    link_root.symlink_to(out, target_is_directory=True)
    check_inside(str(link_root), str(link_root / "bob" / "x.png"))
    with pytest.raises(OutsideRootError):
        check_inside("s3://bucket/out", "s3://bucket/out/../other/x.png")
