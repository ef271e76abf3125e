import pytest

from raypdm.data.layout import LayoutError, list_images, output_name, output_uri, validate_component


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", "~root", "C:evil", "x\x00y", "tab\tname", " lead"])
def test_unsafe_components_are_rejected(bad):
    with pytest.raises(LayoutError):
        validate_component(bad, "identity")


@pytest.mark.parametrize("good", ["id001", "Jane Doe", "n000050", "ünïcode", "a.b.png", "..hidden-ish"])
def test_safe_components_pass(good):
    assert validate_component(good) == good


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_listing_layout_and_problems(tmp_path):
    _touch(tmp_path / "id1" / "set_A" / "0.png")
    _touch(tmp_path / "id1" / "set_B" / "1.jpg")
    _touch(tmp_path / "id1" / "set_Z" / "2.png")  # unknown split
    _touch(tmp_path / "id1" / "set_A" / ".DS_Store")  # hidden: ignored
    _touch(tmp_path / "stray.png")
    refs, problems = list_images(str(tmp_path))
    assert [(r.identity, r.split, r.name) for r in refs] == [("id1", "set_A", "0.png"), ("id1", "set_B", "1.jpg")]
    assert all(r.error is None for r in refs)
    assert any("set_Z" in p for p in problems) and any("stray.png" in p for p in problems)
    refs, _ = list_images(str(tmp_path), splits=["set_B"])
    assert [r.name for r in refs] == ["1.jpg"]


def test_collisions_after_normalisation_become_errors(tmp_path):
    _touch(tmp_path / "id1" / "set_A" / "a.jpg")
    _touch(tmp_path / "id1" / "set_A" / "A.png")
    _touch(tmp_path / "id1" / "set_A" / "b.png")
    refs, _ = list_images(str(tmp_path))
    errs = {r.name: r.error for r in refs}
    assert errs["b.png"] is None
    assert "collides" in errs["a.jpg"] and "collides" in errs["A.png"]


def test_output_paths_stay_under_the_root(tmp_path):
    refs, _ = list_images(str(tmp_path / "missing") if False else str(_mk(tmp_path)))
    for r in refs:
        assert output_uri("/out", r).startswith("/out/")
    assert output_name("x.jpeg") == "x.png"


def _mk(tmp_path):
    _touch(tmp_path / "ds" / "id1" / "set_A" / "0.webp")
    return tmp_path / "ds"


def test_missing_root_and_unknown_identity(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        list_images(str(tmp_path / "nope"))
    _touch(tmp_path / "id1" / "set_A" / "0.png")
    _, problems = list_images(str(tmp_path), identities=["id2"])
    assert any("id2" in p for p in problems)
    with pytest.raises(LayoutError):
        list_images(str(tmp_path), identities=[".."])


def test_file_uris_work_like_paths(tmp_path):
    _touch(tmp_path / "id1" / "set_A" / "0.png")
    refs, problems = list_images(f"file://{tmp_path}")
    assert not problems and [r.name for r in refs] == ["0.png"]
    assert output_uri(f"file://{tmp_path}/out", refs[0]) == f"file://{tmp_path}/out/id1/set_A/0.png"
