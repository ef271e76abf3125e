"""LPIPS's ImageNet trunks (torchvision's AlexNet and VGG16 files) as registry models: `lpips-alex`, `lpips-vgg`.

The `lpips` package ships its v0.1 linear layers but takes the trunk from torchvision, which downloads it
into `$TORCH_HOME/hub/checkpoints/` on first use: a hang or a failure on an offline GPU node. Here the
network is never touched: the LPIPS module is always built with a (seeded) random trunk, and the ImageNet
trunk, when asked for, is read from `<weights_dir>/lpips-<net>/<file>` (what `raypdm models fetch` writes)
or, for users who already have it cached, from torchvision's cache folder. Either way its pinned sha256
is checked (once per file version, see verify.py) and the state dict is read with weights_only=True.

Users: faithfulness LPIPS (purify, evaluate, red-team), the protections' LPIPS column and Glaze's budget
(`alex`); IMPRESS's consistency hinge (`vgg`, as the public IMPRESS code ran it).
"""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from raypdm.models.registry import ModelSpec, WeightFile, fetch_command, register
from raypdm.models.weights import MissingWeightsError, read_state_dict

__all__ = [
    "LPIPS_RANDOM_SEED",
    "TRUNKS",
    "MissingTrunkError",
    "build_lpips",
    "find_trunk",
    "load_lpips_net",
    "missing_trunk_error",
    "spec_name",
    "torch_cache_path",
]

Net = Literal["alex", "vgg"]
LPIPS_RANDOM_SEED = 0  # a random trunk must be the same trunk in every worker

# net -> (file name, torchvision's URL, sha256). torchvision names each file after the first 8 hex digits
# of its sha256; the full digests below agree with those prefixes and are the values published download
# manifests pin for these exact URLs (AlexNet: 244,408,911 bytes; VGG16: 553,433,881 bytes).
TRUNKS: dict[str, tuple[str, str, str]] = {
    "alex": (
        "alexnet-owt-7be5be79.pth",
        "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
        "7be5be791159472b1fbf3c69796f7cb30dca7ad8466c2df70058c37116cdee02",
    ),
    "vgg": (
        "vgg16-397923af.pth",
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
    ),
}
_TITLES = {"alex": "AlexNet", "vgg": "VGG16"}
# How a job turns the pretrained trunk off, per net (the CLI flag for faithfulness; IMPRESS's own option).
OFFLINE_HINT = {
    "alex": "`--lpips random`",
    "vgg": "`--set options.impress.lpips_backbone=random` (IMPRESS)",
}


def _net(net: str) -> str:
    if net not in TRUNKS:
        raise ValueError(f"unknown LPIPS trunk {net!r}; choose one of {', '.join(TRUNKS)}")
    return net


def spec_name(net: str) -> str:
    return f"lpips-{_net(net)}"


def torch_cache_path(net: str) -> Path:
    """Where torchvision caches the trunk (honours TORCH_HOME at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TRUNKS[_net(net)][0]


def trunk_candidates(net: str, weights_dir: str | Path | None) -> list[Path]:
    """Where the trunk is looked for, first hit wins: the weights dir, then torchvision's cache."""
    filename = TRUNKS[_net(net)][0]
    own = [Path(weights_dir) / spec_name(net) / filename] if weights_dir else []
    return own + [torch_cache_path(net)]


def find_trunk(net: str, weights_dir: str | Path | None) -> Path | None:
    return next((p for p in trunk_candidates(net, weights_dir) if p.is_file()), None)


def torch_cache_curl(net: str) -> str:
    """The `curl` that puts the trunk where torchvision caches it (no weights dir needed)."""
    _, url, _ = TRUNKS[_net(net)]
    cache = torch_cache_path(net)
    return f"mkdir -p {shlex.quote(str(cache.parent))} && curl -L -o {shlex.quote(str(cache))} {shlex.quote(url)}"


def trunk_fetch_command(net: str, weights_dir: str | Path | None) -> str:
    if weights_dir:
        return f"{fetch_command([spec_name(net)], weights_dir)}\n# or into torchvision's cache:\n# {torch_cache_curl(net)}"
    return (
        f"{torch_cache_curl(net)}\n"
        f"# or: raypdm models fetch --weights-dir W --model {spec_name(net)}, then pass --weights-dir W"
    )


class MissingTrunkError(MissingWeightsError):
    """An LPIPS trunk in none of the places it is looked for; names them, the fetch command and the
    offline switch."""

    def __init__(self, net: str, weights_dir: str | Path | None):
        self.net = net
        self.model = spec_name(net)
        self.missing = [p.absolute() for p in trunk_candidates(net, weights_dir)]
        self.fetch = trunk_fetch_command(net, weights_dir)
        title, filename = _TITLES[net], TRUNKS[net][0]
        FileNotFoundError.__init__(
            self,
            f"LPIPS-{title} needs torchvision's ImageNet {title} trunk {filename}; looked in:\n"
            + "\n".join(f"  {p}" for p in self.missing)
            + "\nFetch it with:\n"
            + "\n".join(f"  {line}" for line in self.fetch.splitlines())
            + f"\nor run without it: {OFFLINE_HINT[net]} (a seeded random trunk: values for tests and smoke "
            "runs only, not comparable with published LPIPS).",
        )


def missing_trunk_error(net: str, weights_dir: str | Path | None) -> MissingTrunkError:
    return MissingTrunkError(_net(net), weights_dir)


def _load_trunk(net_module: torch.nn.Module, path: Path, arch: str) -> None:
    """torchvision's `features.<i>.*` tensors into lpips' slices (`slice<k>.<i>.*`, same indices)."""
    state = read_state_dict(path)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    wanted = {
        f"{slice_name}.{key}": key
        for slice_name, block in net_module.named_children()
        for key in block.state_dict()
    }
    missing = sorted(src for src in wanted.values() if src not in features)
    if missing:
        raise ValueError(
            f"{path}: not a torchvision {arch} state dict ({len(missing)} trunk tensors missing, "
            f"e.g. features.{missing[0]})"
        )
    try:
        net_module.load_state_dict({dst: features[src] for dst, src in wanted.items()}, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path}: does not fit torchvision's {arch}: {e}") from None


def build_lpips(
    net: str = "alex", device: str | torch.device = "cpu", trunk: str | Path | None = None
) -> torch.nn.Module:
    """LPIPS (v0.1 linear layers, shipped with `lpips`) in eval mode, without touching the network.

    `trunk=None`: the seeded random trunk (seed `LPIPS_RANDOM_SEED`); else the ImageNet trunk read from
    that file (not hash-checked here: `load_lpips_net` and `models.load` do that).
    """
    import lpips

    _net(net)
    # Built with a random trunk either way (torchvision would download otherwise); seeded inside a fork so
    # the caller's RNG is untouched and every worker gets the same random trunk.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")  # lpips' `pretrained=`
        torch.manual_seed(LPIPS_RANDOM_SEED)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if trunk is not None:
        _load_trunk(model.net, Path(trunk), _TITLES[net])
    return model.eval().to(device)


def load_lpips_net(
    net: str, device: str | torch.device = "cpu", weights_dir: str | Path | None = None
) -> torch.nn.Module:
    """LPIPS with the ImageNet trunk from `<weights_dir>/lpips-<net>/` or torchvision's cache, sha256-checked.

    Raises the `MissingWeightsError` of `missing_trunk_error` (both places, the fetch command, the
    offline switch) or `CorruptWeightsError` (a file that is not the pinned one).
    """
    from raypdm import models
    from raypdm.models.verify import verify_file

    path = find_trunk(net, weights_dir)
    if path is None:
        raise missing_trunk_error(net, weights_dir)
    if weights_dir and path == trunk_candidates(net, weights_dir)[0]:
        return models.load(spec_name(net), weights_dir, device=device)
    (wf,) = models.get(spec_name(net)).files  # the registry's pin, wherever the file was found
    if wf.sha256:
        verify_file(spec_name(net), path, wf.sha256, trunk_fetch_command(net, weights_dir))
    return build_lpips(net, device, path)


def _spec(net: str) -> ModelSpec:
    filename, url, sha256 = TRUNKS[net]

    def builder(preset: str, device: Any, dtype: Any) -> torch.nn.Module:
        return _cast(build_lpips(net, device), dtype)

    def loader(model_dir: Path, device: Any, dtype: Any) -> torch.nn.Module:
        return _cast(build_lpips(net, device, Path(model_dir) / filename), dtype)

    return ModelSpec(
        name=spec_name(net),
        description=(
            f"LPIPS {_TITLES[net]} trunk: torchvision's ImageNet {_TITLES[net]} file "
            "(lpips' v0.1 linear layers ship with the package)"
        ),
        licence="torchvision BSD-3-Clause; lpips BSD-2-Clause",
        licence_note=(
            "torchvision's pretrained weights are trained on ImageNet-1k, whose terms allow non-commercial "
            "research use; weights are not redistributed here"
        ),
        hub_repo=None,
        hub_revision=None,
        files=(WeightFile(filename, sha256=sha256, url=url),),
        builder=builder,
        loader=loader,
    )


def _cast(model: torch.nn.Module, dtype: Any) -> torch.nn.Module:
    return model.to(dtype) if dtype is not None else model


ALEX_SPEC = register(_spec("alex"))
VGG_SPEC = register(_spec("vgg"))
