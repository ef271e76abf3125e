"""The job table: every job raypdm runs, in one place.

Each `JobSpec` names a job, its typed config, the function that runs it, its smoke settings, the
hand-named flags that reach into nested sections, and what it needs before Ray starts (inputs made for
smoke runs, weight files). `raypdm <job>` (flags generated from the config), `jobs/<job>.py` (one line
each: `job_main("<job>")`), `raypdm submit <job>` and `raypdm demo` all go through this table, so a job
behaves the same whichever door it is run from.

Config classes and run functions are named by import path and imported only when their job runs:
`raypdm --help` must not pay for importing diffusers.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from raypdm.cli.flags import Flag

__all__ = ["JobSpec", "JOBS", "get_job", "job_names", "required_weights"]


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class JobSpec:
    name: str
    summary: str
    config: str  # "module:Class" of the typed config
    run: str  # "module:function", called as fn(cfg, RunContext) -> JobResult
    smoke: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: {}  # noqa: E731 (data = the layers below smoke)
    flags: tuple[Flag, ...] = ()
    skip: tuple[str, ...] = ()  # config fields that get no generated flag
    aliases: tuple[str, ...] = ()
    group: str | None = None  # `raypdm bench purifiers`: group "bench", command "purifiers"
    command: str | None = None
    # Fills inputs a smoke run was not given (a synthetic dataset under the output): (data, make) -> data.
    # With make=False it only names the paths (for --print-config), writing nothing.
    smoke_inputs: Callable[[dict[str, Any], bool], dict[str, Any]] | None = None
    # Actions that replace the job (`raypdm protect --list`): flag -> function of no arguments.
    actions: tuple[tuple[Flag, str], ...] = ()
    needs_ray: bool = True
    # The job starts Ray itself, only when it has work for it: a finished stage's re-run plans from its
    # manifest and starts nothing (the runner does not start Ray ahead of it).
    ray_on_demand: bool = False

    def config_class(self):
        return _import(self.config)

    def run_function(self):
        return _import(self.run)

    @property
    def cli_name(self) -> str:
        return self.command or self.name


# ---------------------------------------------------------------------------------- smoke settings
def _tiny(data: dict[str, Any]) -> dict[str, Any]:
    return {"preset": "tiny", "weights_dir": None}


def _purify_smoke(data: dict[str, Any]) -> dict[str, Any]:
    from raypdm.purify import parse_spec

    try:
        names = parse_spec(str(data.get("purifier") or "jpeg"))
    except ValueError:
        names = []  # the config's own validation names the bad purifier
    smoke = {**_tiny(data), "workers": 1, "batch_size": 4, "lpips_backbone": "random"}
    if "sr" in names:
        smoke["options"] = {"sr": {"steps": 2}}
    return smoke


def _protect_smoke(data: dict[str, Any]) -> dict[str, Any]:
    from raypdm.protect import protection_options_model

    try:
        fields = protection_options_model(str(data.get("method") or "advdm").replace("-", "_")).model_fields
    except (KeyError, ValueError):
        fields = {}
    options = {k: v for k, v in {"steps": 2, "resample": False, "iterations": 1, "surrogate_steps": 1}.items() if k in fields}
    from raypdm.protect.base import ImageProtectOptions, parse_fraction

    model = protection_options_model(str(data.get("method") or "advdm").replace("-", "_")) if fields else None
    if model is not None and issubclass(model, ImageProtectOptions):
        # Two steps that still reach the radius (K·α ≥ r): a smoke protection as strong as the one it names.
        given = (data.get("options") or {}).get("radius", fields["radius"].default)
        try:
            options["step"] = f"{math.ceil(round(parse_fraction(given) * 255, 6) / 2)}/255"
        except ValueError:
            pass  # the config's own validation names the bad radius
    return {**_tiny(data), "workers": 1, "lpips_backbone": "random", "options": options}


_TRAIN_SMOKE = {"steps": 2, "resolution": 64, "gradient_checkpointing": False}
_DIST_SMOKE = {"backend": "ddp", "workers": 1, "gpus_per_worker": 0}
_PRIOR_SMOKE = {"count": 2, "steps": 2, "resolution": 64}


def _train_smoke(data: dict[str, Any]) -> dict[str, Any]:
    return {**_tiny(data), "train": _TRAIN_SMOKE, "distributed": _DIST_SMOKE, "class_prior": _PRIOR_SMOKE}


def _sample_smoke(data: dict[str, Any]) -> dict[str, Any]:
    return {"workers": 1, "sampling": {"num_images": 2, "steps": 2, "height": 64, "width": 64}}


def _evaluate_smoke(data: dict[str, Any]) -> dict[str, Any]:
    return {**_tiny(data), "workers": 1, "lpips_backbone": "random"}


def _sweep_smoke(data: dict[str, Any]) -> dict[str, Any]:
    return {**_tiny(data),
            "space": {"token_preset": None, "tokens": ["t@j", "bhi"], "rare_tokens": 0, "random_tokens": 0,
                      "templates": ["with {token} noisy pattern"], "w": [3.0, 7.5],
                      "negative_prompts": ["noisy, abstract, pattern, low quality"]},
            "train": _TRAIN_SMOKE, "report_every": 1, "probe_images": 1,
            "sampling": {"num_images": 1, "steps": 2, "size": 64, "batch_size": 1},
            "search": "grid", "num_samples": 1, "scheduler": "none", "class_prior": _PRIOR_SMOKE,
            "max_concurrent": 2}


def _bench_smoke(data: dict[str, Any]) -> dict[str, Any]:
    return {**_tiny(data), "purifiers": ["jpeg", "codeformer"], "images": [8], "images_per_identity": 4,
            "paper_folders": 1, "per_image_samples": 1, "size": 64, "workers": [1]}


def _redteam_smoke(data: dict[str, Any]) -> dict[str, Any]:
    from raypdm.pipelines.redteam import smoke_overrides

    return smoke_overrides()


# ------------------------------------------------------------------------------ smoke inputs (data)
def _output_of(data: dict[str, Any]) -> str:
    from raypdm.data.uri import normalise_uri

    out = data.get("output")
    if not out:
        raise click.UsageError("give --output URI (or `output:` in the config)")
    return normalise_uri(str(out))


def _synthetic(data: dict[str, Any], make: bool, *, identities: int = 2) -> str:
    from raypdm.data.uri import join

    uri = join(_output_of(data), "_smoke_data")
    if make:
        from raypdm.data.synthetic import make_synthetic

        make_synthetic(uri, identities=identities, images=2, seed=0, size=64, real_photos=True)
    return uri


def _fill(*fields: str, identities: int = 2, reference: str | None = None, extra: dict | None = None):
    """A smoke-inputs function: the first missing field in `fields` (and `reference`) get a synthetic set."""

    def fill(data: dict[str, Any], make: bool) -> dict[str, Any]:
        missing = [f for f in fields if not data.get(f)]
        if not missing:
            return data
        uri = _synthetic(data, make, identities=identities)
        data = {**data, **{f: uri for f in missing}, **(extra or {})}
        if reference and not data.get(reference):
            data[reference] = uri
        return data

    return fill


def _sweep_inputs(data: dict[str, Any], make: bool) -> dict[str, Any]:
    if data.get("data") or (data.get("space") or {}).get("data"):
        return data
    uri = _synthetic(data, make)
    return {**data, "data": uri, "reference": data.get("reference") or uri}


def _redteam_inputs(data: dict[str, Any], make: bool) -> dict[str, Any]:
    if data.get("data"):
        return data
    # One identity cut from a real photo: IMS means something even with tiny models.
    return {**data, "data": _synthetic(data, make, identities=1), "identities": data.get("identities") or ["astronaut"]}


def _sample_inputs(data: dict[str, Any], make: bool) -> dict[str, Any]:
    if data.get("models"):
        return data
    from raypdm.data.uri import join

    models = join(_output_of(data), "_smoke_models")
    if make:
        from raypdm.pipelines.train import TrainJobConfig
        from raypdm.pipelines.train import run_train as train

        source = _synthetic(data, True, identities=1)
        train(TrainJobConfig(data=source, output=models, preset="tiny", train=_TRAIN_SMOKE,
                             distributed=_DIST_SMOKE, class_prior=_PRIOR_SMOKE), log=lambda message: None)
    return {**data, "models": models}


# ------------------------------------------------------------------------------------ shared flags
def _pairs(values: list[str]) -> dict[str, str]:
    out = {}
    for pair in values:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected NAME=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


_LPIPS = Flag("--lpips", ("lpips_backbone",), type=click.Choice(["pretrained", "random"]),
              help="LPIPS trunk: ImageNet weights (raypdm models fetch --model lpips-alex) or random (offline, tests)")
_GPUS = Flag("--gpus-per-worker", ("distributed.gpus_per_worker",), type=click.FLOAT, help="GPUs per Ray Train worker")

JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        name="purify", summary="Purify images with a purifier or chain; resumable, with a Parquet manifest.",
        config="raypdm.pipelines.purify:PurifyConfig", run="raypdm.cli.runs:run_purify", smoke=_purify_smoke,
        flags=(_LPIPS,), smoke_inputs=_fill("input"), skip=("options",), ray_on_demand=True,
    ),
    JobSpec(
        name="protect", summary="Craft a protection on every identity's set_A (other splits copied); resumable.",
        config="raypdm.pipelines.protect:ProtectJobConfig", run="raypdm.cli.runs:run_protect", smoke=_protect_smoke,
        flags=(Flag("--radius", ("options.radius",), help="ℓ∞ radius, e.g. 11/255 [method default]"),
               Flag("--step", ("options.step",), help="PGD step size, e.g. 1/255"),
               Flag("--steps", ("options.steps",), type=click.INT, help="PGD steps"), _LPIPS),
        smoke_inputs=_fill("input"), ray_on_demand=True,
        actions=((Flag("--list", (), is_flag=True, help="list the protections and exit"),
                  "raypdm.cli.runs:list_protections"),),
    ),
    JobSpec(
        name="train", aliases=("finetune",),
        summary="DreamBooth + CDL fine-tuning, one Ray Train run per identity, many in parallel.",
        config="raypdm.pipelines.train:TrainJobConfig", run="raypdm.cli.runs:run_train", smoke=_train_smoke,
        flags=(Flag("--steps", ("train.steps",), type=click.INT, help="optimisation steps per identity [1000]"),
               Flag("--workers-per-identity", ("distributed.workers",), type=click.INT,
                    help="Ray Train workers per identity [1]"),
               _GPUS,
               Flag("--deepspeed-stage", ("distributed.zero_stage",), type=click.IntRange(0, 3), help="ZeRO stage [2]"),
               Flag("--ddp", ("distributed.backend",), is_flag=True, value="ddp", help="plain DDP instead of DeepSpeed")),
        smoke_inputs=_fill("data"),
    ),
    JobSpec(
        name="sample", summary="Decoupled negative-guidance sampling (paper Eq. 6) of every trained identity.",
        config="raypdm.pipelines.sample:SampleJobConfig", run="raypdm.cli.runs:run_sample", smoke=_sample_smoke,
        flags=(Flag("--w-neg", ("sampling.w",), type=click.FLOAT,
                    help="decoupled guidance weight w of Eq. 6; guidance_scale = 1 + w [6.5: the paper's CFG 7.5]"),
               Flag("--num-images", ("sampling.num_images",), type=click.INT, help="images per prompt [16]"),
               Flag("--steps", ("sampling.steps",), type=click.INT, help="denoising steps [100]"),
               Flag("--prompts", ("sampling.prompts",), multiple=True,
                    help="generation prompt (repeatable) [the paper's two]"),
               Flag("--size", ("sampling.height", "sampling.width"), type=click.INT, help="image side [512]")),
        smoke_inputs=_sample_inputs, ray_on_demand=True,
    ),
    JobSpec(
        name="evaluate", summary="Score images: identity (IMS, FDFR), quality (Q), faithfulness, latent mismatch.",
        config="raypdm.pipelines.evaluate:EvaluateConfig", run="raypdm.cli.runs:run_evaluate", smoke=_evaluate_smoke,
        flags=(Flag("--setting", ("settings",), multiple=True, convert=_pairs, metavar="NAME=VALUE",
                    help="label every row, e.g. --setting method=codesr --setting protection=advdm"),
               Flag("--group", ("mismatch_groups",), multiple=True, convert=_pairs, metavar="NAME=URI",
                    help="extra image set for the mismatch probe, e.g. --group protected=runs/protected"),
               _LPIPS),
        skip=("settings", "mismatch_groups"),
        smoke_inputs=_fill("images", reference="reference"), ray_on_demand=True,
    ),
    JobSpec(
        name="sweep", aliases=("sweep_noise_tokens", "sweep-noise-tokens"),
        summary="Noise-token × template × w search on Ray Tune (one fine-tune per token, every w from it).",
        config="raypdm.search.sweep:SweepConfig", run="raypdm.cli.runs:run_sweep", smoke=_sweep_smoke,
        smoke_inputs=_sweep_inputs,
    ),
    JobSpec(
        name="redteam",
        summary="The red-team matrix: protect → purify → train → sample → evaluate, tables and report.html.",
        config="raypdm.pipelines.redteam:RedteamConfig", run="raypdm.cli.runs:run_redteam", smoke=_redteam_smoke,
        flags=(_LPIPS,), smoke_inputs=_redteam_inputs,
    ),
    JobSpec(
        name="bench", group="bench", command="purifiers",
        summary="Purifier throughput at several job sizes: the paper's way, a plain loop, batched, and raypdm on Ray.",
        config="raypdm.bench.purifiers:PurifierBenchConfig", run="raypdm.cli.runs:run_bench", smoke=_bench_smoke,
        needs_ray=False,  # each ray-mode run is `raypdm purify` in its own process, timed from outside
    ),
    JobSpec(
        name="demo", summary="The whole pipeline on tiny models and synthetic data, on an embedded local Ray.",
        config="raypdm.demo:DemoConfig", run="raypdm.cli.runs:run_demo",
    ),
)

_BY_NAME = {spec.name: spec for spec in JOBS} | {alias: spec for spec in JOBS for alias in spec.aliases}


def job_names() -> list[str]:
    return [spec.name for spec in JOBS]


def get_job(name: str) -> JobSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown job {name!r}; jobs: {', '.join(job_names())}") from None


# ------------------------------------------------------------------------------------- weights needed
# Which registry models a component loads at the `full` preset (tiny presets build random weights).
_PURIFIER_MODELS = {
    "codeformer": ["codeformer"], "sr": ["sd-x4-upscaler"], "codesr": ["codeformer", "sd-x4-upscaler"],
    "pixel_diffpure": ["adm256-uncond"], "ddspure": ["adm256-uncond"], "gridpure": ["adm256-uncond"],
    "latent_diffpure": ["sd21-base"], "latent_diffpure_null": ["sd21-base"], "impress": ["sd21-base"],
}
_PROTECTION_MODELS = {"adaptive_codesr": ["sd21-base", "codeformer", "sd-x4-upscaler"]}
_METRIC_MODELS = {"ims": ["antelopev2", "vggface"], "q": ["clip-vit-b32", "liqe"], "mismatch": ["clip-vit-b32"]}


def _purifier_models(spec: str) -> list[str]:
    from raypdm.purify import parse_spec

    out: list[str] = []
    for name in parse_spec(spec):
        out += _PURIFIER_MODELS.get(name, [])
    return out


def _eval_models(metrics) -> list[str]:
    return [m for metric in metrics for m in _METRIC_MODELS.get(metric, [])]


def _glaze_lpips(method: str, options: dict, full: bool) -> list[str]:
    """Glaze's perceptual budget loads LPIPS-Alex: pretrained when asked, or at the full preset ("auto")."""
    if method != "glaze":
        return []
    backbone = options.get("lpips_backbone", "auto")
    return ["alex"] if backbone == "pretrained" or (backbone == "auto" and full) else []


def required_weights(job: str, cfg) -> tuple[list[str], list[str]]:
    """(registry models whose files the job will read, LPIPS trunks it will load) for a validated config."""
    full = getattr(cfg, "preset", "tiny") == "full"
    lpips = ["alex"] if getattr(cfg, "lpips_backbone", "random") == "pretrained" else []
    models: list[str] = []
    if job == "purify":
        models = _purifier_models(cfg.purifier) if full else []
        lpips = lpips if cfg.faithfulness else []
        if "impress" in cfg.purifier:
            impress = cfg.options.get("impress", {})
            if impress.get("lpips_backbone", "pretrained") == "pretrained":
                lpips.append(impress.get("lpips_net", "vgg"))
    elif job == "protect":
        method = cfg.method.strip().lower().replace("-", "_")
        models = (["sd21-base"] + _PROTECTION_MODELS.get(method, [])) if full else []
        lpips += _glaze_lpips(method, cfg.options, full)
    elif job == "train":
        models = ["sd21-base"] if full else []
        lpips = []
    elif job == "evaluate":
        models = _eval_models(cfg.metrics) if full else []
        lpips = lpips if {"lpips"} & set(cfg.metrics) else []
    elif job == "sweep":
        models = ["sd21-base", *_eval_models(["ims", "q"])] if full else []
        lpips = []
    elif job == "redteam":
        if full:
            models = ["sd21-base", *_eval_models(cfg.metrics)]
            for p in cfg.protections:
                models += _PROTECTION_MODELS.get(p.label(), [])
            for chain in cfg.purifiers:
                models += _purifier_models(chain) if chain != "none" else []
        for p in cfg.protections:
            lpips += _glaze_lpips(p.label(), p.options, full)
    elif job == "bench":
        if full:
            for chain in cfg.purifiers:
                models += _purifier_models(chain)
        lpips = []
    else:
        lpips = []
    return list(dict.fromkeys(models)), list(dict.fromkeys(lpips))

