"""`raypdm models fetch`: download every registered file into the layout `models.load` reads.

    W/<model>/<file>        exactly the paths `check_weights` and `models.load` look at

- Hub models go through `huggingface_hub.hf_hub_download` at the spec's pinned revision (`HF_ENDPOINT`
  is honoured, read at call time); it retries and resumes an interrupted transfer itself (HTTP Range)
  within the call. Files are staged under `W/<model>/.fetch/` and moved into place only once verified.
- Release-URL files stream into `W/<model>/<file>.part`; a `.part` left by an interrupted run, or a
  connection that drops mid-transfer, is continued with an HTTP Range request.
- A pinned sha256 is checked before a file gets its final name; a mismatch is an error and the download
  is deleted, never kept. An existing file that does not match its pin is replaced only by a verified one.
- Files without any public source (antelopev2) are reported as "bring your own", with where to put them.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from raypdm.models.registry import ModelSpec, WeightFile, get, list_models
from raypdm.models.verify import file_sha256, remember
from raypdm.models.weights import custom_architecture

__all__ = ["FetchResult", "fetch_models", "fetch_spec"]

# (what is being downloaded, bytes so far, total bytes or None)
Progress = Callable[[str, int, "int | None"], None]
_CHUNK = 1 << 18  # what a dropped connection can cost: bytes of an unfinished chunk are re-read
STAGING = ".fetch"

DOWNLOADED, RESUMED, PRESENT, REPLACED, FAILED, BYO = (
    "downloaded", "resumed", "already present", "replaced", "failed", "bring your own",
)  # fmt: skip


@dataclass(frozen=True)
class FetchResult:
    model: str
    file: str  # path inside the model folder
    path: Path  # where it is (or would be) on disk
    status: str  # downloaded | resumed | already present | replaced | failed | bring your own
    size: int | None
    sha256: str  # ok | unpinned | mismatch | pin skipped (custom bundle) | -
    detail: str = ""
    required: bool = True

    @property
    def failed(self) -> bool:
        return self.status == FAILED and self.required


class IncompleteDownload(OSError):
    """The server closed the transfer before the promised number of bytes arrived."""


def _sha_status(spec: ModelSpec, wf: WeightFile, path: Path, weights_dir: Path) -> tuple[str, str]:
    """(sha256 column, detail) for a file at its final or staged location."""
    if not wf.sha256:
        return "unpinned", ""
    found = file_sha256(path, weights_dir)
    if found == wf.sha256:
        return "ok", ""
    if path == spec.model_dir(weights_dir) / wf.path and custom_architecture(spec, spec.model_dir(weights_dir), wf):
        return "pin skipped (custom bundle)", "its own config is not the full architecture the pin is for"
    return "mismatch", f"sha256 {found} != pinned {wf.sha256}"


def _hub_download(spec: ModelSpec, wf: WeightFile, staging: Path, endpoint: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download

    if constants.is_offline_mode():
        raise RuntimeError("huggingface_hub is in offline mode (HF_HUB_OFFLINE is set): unset it to fetch")
    local = hf_hub_download(
        spec.hub_repo,
        wf.path,
        revision=spec.hub_revision or "main",
        local_dir=staging,
        endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None,
    )
    return Path(local)


def _url_download(
    url: str, target: Path, *, retries: int, timeout: float, backoff_s: float, progress: Progress | None
) -> tuple[Path, bool]:
    """Stream `url` into `<target>.part`, continuing what is already there; (the .part, resumed?)."""
    import requests

    part = target.with_name(target.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    resumed = False
    attempt = 0
    with requests.Session() as session:
        session.headers["User-Agent"] = "raypdm-models-fetch"
        while True:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with session.get(url, headers=headers, stream=True, timeout=(10, timeout)) as r:
                    if r.status_code == 416 and have:
                        return part, resumed  # the .part already holds every byte: the hash decides
                    r.raise_for_status()
                    if have and r.status_code != 206:
                        have = 0  # the server ignored the Range header: start over
                    resumed = resumed or have > 0
                    length = r.headers.get("Content-Length")
                    total = have + int(length) if length is not None and length.isdigit() else None
                    done = have
                    with part.open("ab" if have else "wb") as f:
                        for chunk in r.iter_content(_CHUNK):
                            f.write(chunk)
                            done += len(chunk)
                            if progress:
                                progress(target.name, done, total)
                if total is not None and done != total:
                    raise IncompleteDownload(f"got {done} of {total} bytes")
                return part, resumed
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    IncompleteDownload):  # fmt: skip
                attempt += 1
                if attempt > retries:
                    raise
                time.sleep(backoff_s * 2 ** (attempt - 1))


def _fetch_file(
    spec: ModelSpec, wf: WeightFile, weights_dir: Path, *, endpoint: str | None, retries: int, timeout: float,
    backoff_s: float, progress: Progress | None,
) -> FetchResult:  # fmt: skip
    target = spec.model_dir(weights_dir) / wf.path

    def result(status: str, sha: str = "-", detail: str = "", path: Path = target) -> FetchResult:
        size = path.stat().st_size if path.is_file() else None
        return FetchResult(spec.name, wf.path, target, status, size, sha, detail, wf.required)

    replacing = ""
    if target.is_file():
        sha, detail = _sha_status(spec, wf, target, weights_dir)
        if sha != "mismatch":
            return result(PRESENT, sha, detail)
        replacing = detail
    if not spec.hub_repo and not wf.url:
        return result(BYO, "-", f"no public download: place it at {target}")
    staged: Path | None = None
    try:
        if spec.hub_repo:
            staged, resumed = _hub_download(spec, wf, spec.model_dir(weights_dir) / STAGING, endpoint), False
        else:
            staged = target.with_name(target.name + ".part")  # named now, so a failure can point at it
            staged, resumed = _url_download(
                wf.url, target, retries=retries, timeout=timeout, backoff_s=backoff_s, progress=progress
            )
        sha, detail = _sha_status(spec, wf, staged, weights_dir)
        if sha == "mismatch":
            staged.unlink()
            return result(FAILED, sha, f"downloaded file does not match its pin ({detail}); not kept")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
        if sha == "ok":
            remember(target, wf.sha256, weights_dir)  # so the first `models.load` does not hash it again
    # One file's failure (HTTP error, unknown revision, offline mode, disk full) must not stop the others:
    # the table reports each, and the exit status says whether any failed.
    except Exception as e:  # noqa: BLE001
        kept = f"; partial download kept for resuming: {staged}" if staged is not None and staged.exists() else ""
        return result(FAILED, "-", f"{type(e).__name__}: {e}{kept}")
    if replacing:
        return result(REPLACED, sha, f"the old file did not match its pin ({replacing})")
    return result(RESUMED if resumed else DOWNLOADED, sha, detail)


def fetch_spec(
    spec: ModelSpec, weights_dir: str | Path, *, endpoint: str | None = None, retries: int = 3,
    timeout: float = 60.0, backoff_s: float = 1.0, progress: Progress | None = None,
) -> list[FetchResult]:  # fmt: skip
    """Fetch one model's files (see the module docstring); one `FetchResult` per registered file."""
    weights_dir = Path(weights_dir).absolute()
    options = {"endpoint": endpoint, "retries": retries, "timeout": timeout, "backoff_s": backoff_s,
               "progress": progress}  # fmt: skip
    out = [_fetch_file(spec, wf, weights_dir, **options) for wf in spec.files]
    staging = spec.model_dir(weights_dir) / STAGING
    if staging.is_dir() and not any(r.status == FAILED for r in out):
        shutil.rmtree(staging, ignore_errors=True)  # only hub bookkeeping is left once every file moved
    return out


def fetch_models(
    weights_dir: str | Path, names: Iterable[str] | None = None, **kwargs
) -> list[FetchResult]:
    """Fetch the named models (default: every registered one) into `weights_dir`; see `fetch_spec`."""
    specs = [get(n) for n in (list(names or []) or list_models())]  # unknown names fail before any download
    return [r for spec in specs for r in fetch_spec(spec, weights_dir, **kwargs)]
