import numpy as np

from raypdm.data.decode import decode_image
from raypdm.data.layout import list_images
from raypdm.data.synthetic import make_synthetic, synthetic_face


def test_deterministic_and_distinct():
    a = synthetic_face(0, "id000", 1, 64)
    assert np.array_equal(a, synthetic_face(0, "id000", 1, 64))
    assert not np.array_equal(a, synthetic_face(0, "id000", 2, 64))
    assert not np.array_equal(a, synthetic_face(1, "id000", 1, 64))
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)


def test_layout_and_bytes_are_reproducible(tmp_path):
    make_synthetic(str(tmp_path / "a"), identities=2, images=2, seed=3, size=48, real_photos=True)
    make_synthetic(str(tmp_path / "b"), identities=2, images=2, seed=3, size=48, real_photos=True)
    refs, problems = list_images(str(tmp_path / "a"))
    assert not problems and len(refs) == 3 * 3 * 2
    assert {r.identity for r in refs} == {"id000", "id001", "astronaut"}
    for r in refs:
        rel = f"{r.identity}/{r.split}/{r.name}"
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
        assert decode_image((tmp_path / "a" / rel).read_bytes()).shape == (48, 48, 3)
