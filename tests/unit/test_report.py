"""The report index and the self-contained HTML report (including a headless-Chromium render)."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import uuid

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raypdm.data.uri import write_bytes
from raypdm.metrics.tables import table1, write_table
from raypdm.report import GridRow, ImageGrid, PlotRef, ReportIndex, TableRef, render_report, write_report

# Far from each other and from the page's white/grey/black, so a screenshot pixel can only match one.
COLOURS = {
    "clean": (230, 25, 75),
    "protected": (60, 180, 75),
    "purified": (0, 130, 200),
    "generated": (255, 225, 25),
    "clean2": (145, 30, 180),
    "protected2": (70, 240, 240),
}
BIG = (240, 50, 230)
PLOT = (128, 128, 0)
EVIL = "<b>evil</b> & \"co\" <script>alert(1)</script>"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _table_frame() -> pd.DataFrame:
    rows = []
    for i in range(3):
        rows.append({"method": "none", "protection": "aspl", "identity": f"id{i}", "ims": 0.1 * i, "q": 0.2})
        rows.append({"method": "codesr", "protection": "aspl", "identity": f"id{i}", "ims": 0.1 * i + 0.3, "q": 0.4})
    return pd.DataFrame(rows)


def _run_dir(root: str) -> tuple[str, ReportIndex]:
    """A run dir with 2 grids (one missing file, one None cell), 4 tables (md/html/parquet/bad fragment),
    a plot and a missing plot; URIs relative except one absolute."""
    sep = "" if root.endswith("/") else "/"
    for name, colour in COLOURS.items():
        write_bytes(f"{root}{sep}img/{name}.png", _png(colour))
    write_bytes(f"{root}{sep}img/big.png", _png(BIG, (600, 400)))
    write_bytes(f"{root}{sep}plots/mismatch.png", _png(PLOT, (500, 200)))
    uris = write_table(table1(_table_frame(), baselines="none"), f"{root}{sep}tables/table1")
    write_bytes(f"{root}{sep}tables/evil.html", (
        b'<table onclick="x()"><tr><td style="background:url(http://evil.example/a.png)" colspan="2">ok'
        b'<img src="http://evil.example/x.png"><a href="https://evil.example/">link</a></td></tr>'
        b"<script>alert('x')</script></table><style>body{display:none}</style>"
    ))
    index = ReportIndex(
        title="run <1> & report",
        created="2026-11-22T12:00:00+00:00",
        facts={"purifier": "codesr", "user <note>": "a & b"},
        grids=[
            ImageGrid(identity="alice", columns=["clean", "protected", "purified", "generated"], rows=[
                GridRow(label="img_0", images=["img/clean.png", "img/protected.png", "img/purified.png",
                                               uris["md"].replace("table1.md", "../img/generated.png")]),
                GridRow(label="img_1", images=["img/big.png", None, "img/does_not_exist.png", None]),
            ]),
            ImageGrid(identity=EVIL, columns=["clean", "protected"], rows=[
                GridRow(label="row <1>", images=["img/clean2.png", "img/protected2.png"]),
            ]),
        ],
        tables=[
            TableRef(title="Table 1 (markdown)", uri="tables/table1.md", caption="IMS & Q"),
            TableRef(title="Table 1 (html)", uri="tables/table1.html"),
            TableRef(title="Table 1 (parquet)", uri="tables/table1.parquet"),
            TableRef(title="hostile fragment", uri="tables/evil.html"),
            TableRef(title="absent", uri="tables/absent.md"),
        ],
        plots=[PlotRef(title="latent mismatch", uri="plots/mismatch.png", caption="CLIP probe"),
               PlotRef(title="benchmark", uri="plots/missing.png")],
    )
    index.write(root)
    return root, index


def _data_images(text: str) -> list[Image.Image]:
    out = []
    for mime, payload in re.findall(r'src="data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)"', text):
        out.append(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
    return out


def test_index_roundtrip_and_validation(tmp_path):
    _, index = _run_dir(str(tmp_path))
    back = ReportIndex.read(str(tmp_path))
    assert back == index
    assert (tmp_path / "report_index.json").exists()
    with pytest.raises(ValueError, match="row 'r': 1 images for 2 columns"):
        ImageGrid(identity="a", columns=["x", "y"], rows=[GridRow(label="r", images=["a.png"])])
    with pytest.raises(ValueError, match="must end in one of"):
        TableRef(title="t", uri="t.csv")
    with pytest.raises(ValueError, match="unknown|extra"):
        ReportIndex.model_validate({"title": "t", "created": "now", "grid": []})
    with pytest.raises(FileNotFoundError, match="report_index.json"):
        ReportIndex.read(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report_index.json").write_text('{"title": 3}')
    with pytest.raises(ValueError, match="not a report index"):
        ReportIndex.read(str(tmp_path / "bad"))


def test_merged_replaces_parts_by_key():
    a = ReportIndex(title="a", created="1", facts={"x": "1"},
                    grids=[ImageGrid(identity="i", columns=["c"], rows=[])],
                    tables=[TableRef(title="t", uri="a.md"), TableRef(title="u", uri="u.md")])
    b = ReportIndex(title="b", created="2", facts={"y": "2"},
                    tables=[TableRef(title="t", uri="b.md")], plots=[PlotRef(title="p", uri="p.png")])
    m = a.merged(b)
    assert m.title == "b" and m.facts == {"x": "1", "y": "2"}
    assert [(t.title, t.uri) for t in m.tables] == [("u", "u.md"), ("t", "b.md")]
    assert len(m.grids) == 1 and len(m.plots) == 1
    rel = ReportIndex(title="r", plots=[PlotRef(title="p", uri="/runs/x/plots/p.png")]).relative_to("/runs/x")
    assert rel.plots[0].uri == "plots/p.png"


def test_report_is_self_contained_escaped_and_warns(tmp_path):
    run_dir, _ = _run_dir(str(tmp_path))
    out = write_report(run_dir)
    assert out == f"{run_dir}/report.html"
    text = (tmp_path / "report.html").read_text(encoding="utf-8")

    # Nothing external: every src/href is a data: URI or an in-page anchor; no scripts, no url(...).
    refs = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', text, flags=re.IGNORECASE)
    assert refs and all(r.startswith(("data:image/", "#")) for r in refs), refs
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*https?://", text, flags=re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "onclick" not in text and "url(" not in text

    # User text is escaped everywhere it appears.
    assert "<b>evil</b>" not in text
    assert "&lt;b&gt;evil&lt;/b&gt; &amp; &quot;co&quot; &lt;script&gt;" in text
    assert "run &lt;1&gt; &amp; report" in text and "row &lt;1&gt;" in text and "user &lt;note&gt;" in text

    # 7 grid images + 1 plot inline; every grid colour is there; thumbnails are at most 256 px.
    images = _data_images(text)
    assert len(images) == 8
    seen = {tuple(int(v) for v in np.asarray(im)[im.height // 2, im.width // 2]) for im in images}
    for colour in [*COLOURS.values(), BIG, PLOT]:
        assert any(max(abs(a - b) for a, b in zip(colour, s)) <= 3 for s in seen), colour
    big = [im for im in images if im.size[0] > 64 and im.size != (500, 200)]
    assert [im.size for im in big] == [(256, 171)]

    # Tables: markdown, html and parquet renderings of the same table, and the hostile fragment's text.
    assert text.count("0.400 ± 0.000") == 3  # codesr's Q cell in md, html and parquet renderings
    assert ">ok" in text and "link" in text

    # Missing things are labelled cells / placeholders and listed at the bottom; None cells are not.
    warnings = text[text.index('id="warnings"'):]
    assert "does_not_exist.png" in warnings and "absent.md" in warnings and "missing.png" in warnings
    assert warnings.count("<li>") == 3
    assert text.count('class="missing"') == 3  # one missing file + two None cells
    assert ">missing<br>purified<" in text


def test_report_on_memory_filesystem():
    root = f"memory://raypdm-report-{uuid.uuid4().hex[:8]}"
    run_dir, index = _run_dir(root)
    out = write_report(run_dir, out_uri=f"{root}/elsewhere/r.html")
    from raypdm.data.uri import read_bytes

    text = read_bytes(out).decode()
    assert len(_data_images(text)) == 8
    html_again, warnings = render_report(index, run_dir)
    assert len(warnings) == 3 and html_again.count("data:image/") == 8


def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the HTML checks above still ran")
    run_dir, _ = _run_dir(str(tmp_path / "run"))
    out = write_report(run_dir)
    shot = tmp_path / "shot.png"
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}"]
    url = f"file://{out}"
    dom = subprocess.run([*common, "--dump-dom", url],
                         check=False, capture_output=True, text=True, timeout=120, env=env)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('src="data:image/') == 8 and "Image grids" in dom.stdout
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", url],
                         check=False, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for name, colour in {**COLOURS, "big": BIG}.items():
        near = np.all(np.abs(pixels - np.array(colour)) <= 12, axis=-1).sum()
        # A 64x64 cell is 4096 pixels; allow for borders and scaling but not for a missing image.
        assert near >= 3000, f"grid cell {name} {colour}: only {near} pixels of its colour in the screenshot"


def test_corrupt_and_transparent_images(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # transparent black: must show as white, not black
    rgba[:10, :10] = (0, 0, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue())
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    index = ReportIndex(title="t", grids=[ImageGrid(identity="a", columns=["x", "y"], rows=[
        GridRow(label="r", images=["cut.png", "corrupt.png"])])])
    text, warnings = render_report(index, str(tmp_path))
    assert len(warnings) == 1 and "corrupt.png" in warnings[0]
    (image,) = _data_images(text)
    assert tuple(np.asarray(image)[30, 30]) == (255, 255, 255)
    assert tuple(np.asarray(image)[5, 5]) == (0, 0, 255)
