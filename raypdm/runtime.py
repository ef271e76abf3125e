"""Ray and device setup shared by every command.

On a laptop `init_ray()` starts an embedded local cluster sized to the machine; under `ray job submit`
(or with RAY_ADDRESS set) it connects to the cluster instead. Tests declare logical GPUs to exercise GPU
scheduling on CPU-only machines; code then still runs on the CPU because CUDA is absent.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["init_ray", "default_device", "cuda_available", "ray_resources"]

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # a broken CUDA install must not stop CPU work
        return False


def default_device(prefer: str | None = None) -> str:
    """`prefer` if given ("cpu", "cuda", "cuda:1"); otherwise CUDA when present, else the CPU."""
    if prefer:
        if prefer.startswith("cuda") and not cuda_available():
            log.warning("device %s requested but CUDA is not available; using cpu", prefer)
            return "cpu"
        return prefer
    return "cuda" if cuda_available() else "cpu"


def init_ray(
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    logical_gpus: int | None = None,
    quiet: bool = True,
    **kwargs: Any,
) -> dict[str, float]:
    """Connect to Ray once per process and return the cluster's resources.

    address: a cluster address; defaults to RAY_ADDRESS; without either a local cluster starts.
    logical_gpus: declare this many GPUs on the local cluster even without CUDA (tests, scheduling demos).
    """
    import ray

    if ray.is_initialized():
        return ray_resources()
    address = address or os.environ.get("RAY_ADDRESS") or None
    opts: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": not quiet}
    if quiet:
        opts["logging_level"] = logging.WARNING
    opts.update(kwargs)
    if address:
        ray.init(address=address, **opts)
    else:
        if num_gpus is None:
            num_gpus = logical_gpus if logical_gpus is not None else _cuda_count()
        opts.setdefault("include_dashboard", False)
        tmp = os.environ.get("RAY_TMPDIR")
        if tmp:
            opts.setdefault("_temp_dir", tmp)
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus, **opts)
    _configure_data(quiet)
    return ray_resources()


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _configure_data(quiet: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # Our own progress display reads the stream in the driver; Ray's bars would interleave with it.
    ctx.enable_progress_bars = not quiet
    if quiet:
        # Ray Data logs each execution plan at INFO; the full logs stay in the session's log folder.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Model actors can take a while to load real weights; do not give up on them early.
    ctx.wait_for_min_actors_s = max(getattr(ctx, "wait_for_min_actors_s", 0) or 0, 600)


def ray_resources() -> dict[str, float]:
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
