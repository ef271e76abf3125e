"""Self-contained HTML reports of a run directory (see `raypdm.report.html`), driven by the
`report_index.json` the pipelines write (see `raypdm.report.index`)."""

from raypdm.report.html import REPORT_NAME, render_report, write_report
from raypdm.report.index import INDEX_NAME, GridRow, ImageGrid, PlotRef, ReportIndex, TableRef, resolve_uri

__all__ = [
    "INDEX_NAME",
    "REPORT_NAME",
    "GridRow",
    "ImageGrid",
    "PlotRef",
    "ReportIndex",
    "TableRef",
    "render_report",
    "resolve_uri",
    "write_report",
]
