"""Pre-flight: before Ray starts, is every weight file a job will read on disk? One error lists them all.

    from raypdm.models.preflight import check_models
    check_models(["codeformer", "sd-x4-upscaler"], "/weights", lpips=["alex"])

Presence only (no hashing, so it costs milliseconds even for 20 GB of weights): the load-time check in
`models.load` verifies the hashes where the files are read. A job that would fail in its actors after
minutes of scheduling fails here instead, with every missing file, the one `raypdm models fetch` command
that gets them all and, for LPIPS, the offline switch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from raypdm.models.lpips_trunks import (
    OFFLINE_HINT,
    find_trunk,
    spec_name,
    torch_cache_curl,
    trunk_candidates,
)
from raypdm.models.registry import fetch_command, get
from raypdm.models.weights import MissingWeightsError, resolve_weight_file

__all__ = ["MissingJobWeightsError", "check_models", "missing_files"]


class MissingJobWeightsError(MissingWeightsError):
    """Every file a job needs and does not have, across models. `missing` maps model -> paths."""

    def __init__(self, missing: dict[str, list[Path]], weights_dir: str | Path | None, lpips: list[str]):
        self.model = ", ".join(missing)
        self.by_model = missing
        self.missing = [p for paths in missing.values() for p in paths]
        byo = [name for name in missing if not get(name).downloadable]
        fetchable = [name for name in missing if name not in byo]
        self.fetch = fetch_command(fetchable, weights_dir or "W") if fetchable else ""
        lines = [f"{len(self.missing)} weight file(s) this job reads are missing:"]
        for name, paths in missing.items():
            lines += [f"  {name}: {p}" for p in paths]
        if not weights_dir:
            lines.append("No weights dir is set: pass --weights-dir W (the folder `raypdm models fetch` fills).")
        if self.fetch:
            lines += ["Fetch them with:", f"  {self.fetch}"]
        for name in byo:
            where = get(name).model_dir(weights_dir or "W")
            files = ", ".join(f.path for f in get(name).files)
            lines.append(f"  {name} has no public download: copy {files} from your own copy into {where}/")
        for net in lpips:
            if spec_name(net) in missing:
                cache = f"{spec_name(net)} (LPIPS's ImageNet trunk) also works from torchvision's cache: "
                offline = f"or run it offline: {OFFLINE_HINT[net]} (a seeded random trunk: values for tests and "
                lines.append(cache + torch_cache_curl(net))
                lines.append(offline + "smoke runs only, not comparable with published LPIPS).")
        lines.append("(`raypdm models check --weights-dir W` lists every file, with `hf download`/`curl` equivalents.)")
        FileNotFoundError.__init__(self, "\n".join(lines))


def missing_files(
    names: Iterable[str], weights_dir: str | Path | None, *, lpips: Iterable[str] = ()
) -> dict[str, list[Path]]:
    """model -> required files not on disk, for registry `names` and LPIPS trunk nets.

    A model's files live under `<weights_dir>/<model>/`; without a weights dir every file of `names` is
    missing. An LPIPS trunk counts as present in `<weights_dir>/lpips-<net>/` or in torchvision's cache,
    and is listed at its weights-dir path (the cache path when there is no weights dir).
    """
    out: dict[str, list[Path]] = {}
    for name in dict.fromkeys(names):
        spec = get(name)  # KeyError naming the known models for a typo
        # Without a weights dir the paths are shown under the placeholder W the fetch command uses.
        model_dir = spec.model_dir(weights_dir).absolute() if weights_dir else spec.model_dir("W")
        gone = [
            model_dir / f.path
            for f in spec.files
            if f.required and (not weights_dir or resolve_weight_file(model_dir / f.path) is None)
        ]
        if gone:
            out[name] = gone
    for net in dict.fromkeys(lpips):
        if find_trunk(net, weights_dir) is None:
            out.setdefault(spec_name(net), []).append(trunk_candidates(net, weights_dir)[0].absolute())
    return out


def check_models(names: Iterable[str], weights_dir: str | Path | None, *, lpips: Iterable[str] = ()) -> None:
    """Raise one `MissingJobWeightsError` (a `MissingWeightsError`, so a `FileNotFoundError`) listing every
    missing file of the registry models `names` and the LPIPS trunks `lpips` ("alex", "vgg"), with the
    `raypdm models fetch --weights-dir W --model A --model B` command and, for a missing trunk, the flag
    that runs without it. Returns None when everything is there. Tiny presets need no files: pass no
    names for them; pass an LPIPS net only when its pretrained trunk will be loaded.
    """
    lpips = list(dict.fromkeys(lpips))
    missing = missing_files(names, weights_dir, lpips=lpips)
    if missing:
        raise MissingJobWeightsError(missing, weights_dir, lpips)
