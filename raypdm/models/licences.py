"""Licence acceptance for restricted models (non-commercial or research-only terms).

`raypdm models fetch` downloads a `ModelSpec.restricted` model only once its licence has been accepted
for that weights dir: with `--accept-licence NAME` (or `all`) on the command line, recorded in
`<weights-dir>/.raypdm-licences.json` (licence text and UTC time), so later fetches into the same folder
need no flag. Bring-your-own models (nothing to download) are never gated: whoever places the file has
the terms from its source.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from raypdm.models.registry import ModelSpec

__all__ = ["LICENCE_FILE", "LicenceNotAccepted", "accepted", "gate"]

LICENCE_FILE = ".raypdm-licences.json"


class LicenceNotAccepted(Exception):
    """Restricted models asked for without their licence accepted; names each and the flag to pass."""

    def __init__(self, specs: list[ModelSpec], command: str):
        self.models = [s.name for s in specs]
        terms = "\n".join(f"  {s.name}: {s.licence}\n    {s.licence_note}" for s in specs)
        flags = " ".join(f"--accept-licence {s.name}" for s in specs)
        super().__init__(
            f"{len(specs)} model(s) come under terms that limit their use; read them:\n{terms}\n"
            f"Nothing was downloaded. If your use is within these terms, run again with {flags}:\n"
            f"  {command} {flags}"
        )


def accepted(weights_dir: str | Path) -> dict[str, dict]:
    """Licences already accepted for this weights dir: name -> {licence, accepted_at}."""
    path = Path(weights_dir) / LICENCE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(weights_dir: Path, specs: list[ModelSpec]) -> None:
    data = accepted(weights_dir)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for spec in specs:
        data[spec.name] = {"licence": spec.licence, "accepted_at": now}
    weights_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights_dir / f"{LICENCE_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, weights_dir / LICENCE_FILE)


def gate(specs: Iterable[ModelSpec], weights_dir: str | Path, accept: Iterable[str], command: str) -> list[ModelSpec]:
    """Check, before any download, that every restricted downloadable model in `specs` has its licence
    accepted (earlier, or now through `accept`: model names or "all"); record the new acceptances and
    return their specs (the caller prints their terms). Raises `LicenceNotAccepted` naming all the others.
    A licence accepted earlier whose text has since changed counts as not accepted."""
    weights_dir = Path(weights_dir)
    accept = set(accept)
    earlier = accepted(weights_dir)
    now, refused = [], []
    for spec in specs:
        if not (spec.restricted and spec.downloadable):
            continue
        if earlier.get(spec.name, {}).get("licence") == spec.licence:
            continue
        (now if {"all", spec.name} & accept else refused).append(spec)
    if refused:
        raise LicenceNotAccepted(refused, command)
    if now:
        _record(weights_dir, now)
    return now
