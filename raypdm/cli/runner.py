"""Running a job from the table: layers -> validated config -> pre-flight -> Ray -> run -> tables.

    model defaults < protocol (--protocol paper|official-code: raypdm/protocols.py) < yaml (--config)
        < smoke (--smoke: the table's smoke settings, then the YAML's `smoke:` section)
        < flags < --set key=value                    (raypdm.config.merge_layers)
    -> smoke inputs named (a synthetic dataset under the output when a smoke run has none)
    -> validated config: every path absolute, every error with its full field path
    -> --print-config: the resolved YAML, each value commented with the layer it came from, then exit
    -> pre-flight, before Ray starts: every weight file the job will read is present
    -> the output root's lock (one writer per output: raypdm/data/lock.py)
    -> quiet Ray, the job's run function, its terminal tables

`run_job` is the same path for the CLI, `jobs/*.py` and the demo.
"""

from __future__ import annotations

import contextlib
from typing import Any

import click

from raypdm.cli.jobs import JobSpec, get_job, required_weights
from raypdm.cli.runs import JobResult, RunContext
from raypdm.config import ConfigError, merge_layers, parse_overrides, read_yaml, validate_config

__all__ = ["JobAbort", "annotated_yaml", "job_data", "resolve_job_config", "preflight", "run_job"]


class JobAbort(click.ClickException):
    """A job that cannot start as asked (config, inputs, weights): one message, exit status 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def job_data(spec: JobSpec, *, config_path: str | None = None, smoke: bool = False,
             flags: dict[str, Any] | None = None, overrides: tuple[str, ...] | list[str] = (),
             sources: dict[str, str] | None = None) -> dict[str, Any]:
    """The job's raw config data from its layers (see the module docstring). `sources`, when given, is
    filled with each set value's dot path -> the layer that set it last (for `--print-config`)."""
    from raypdm.config import deep_merge
    from raypdm.protocols import DEFAULT_PROTOCOL, protocol_layer

    yaml_data = read_yaml(config_path) if config_path else {}
    smoke_layer: dict[str, Any] = {}
    if smoke:
        # What the smoke settings adapt to (the purifier chain, the method) comes from every layer.
        seen = merge_layers(yaml_data=yaml_data, smoke=yaml_data.get("smoke"), flags=flags, overrides=overrides)
        smoke_layer = deep_merge(spec.smoke(seen), yaml_data.get("smoke") or {})
    data = merge_layers(yaml_data=yaml_data, smoke=smoke_layer, flags=flags, overrides=overrides)
    protocol = data.get("protocol", DEFAULT_PROTOCOL)
    base = protocol_layer(spec.config_class(), protocol) if isinstance(protocol, str) else {}
    if sources is not None:
        layers = [(f"protocol {protocol}", base), (f"config {config_path}", {k: v for k, v in yaml_data.items()
                                                                              if k != "smoke"}),
                  ("--smoke", smoke_layer), ("flag", {k: v for k, v in (flags or {}).items() if v is not None}),
                  ("--set", parse_overrides(overrides) if overrides else {})]
        for name, layer in layers:
            for path in _leaf_paths(layer):
                sources[path] = name
    return deep_merge(base, data)


def _leaf_paths(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _leaf_paths(value, path + ".")
        else:
            out.append(path)
    return out


def _model_default(model: Any, path: str) -> Any:
    """The model default at a dot path (JSON form), or `_UNKNOWN` (a required field, a list item...)."""
    node: Any = None
    for part in path.split("."):
        if model is not None and part in getattr(model, "model_fields", {}):
            info = model.model_fields[part]
            if info.is_required():
                return _REQUIRED  # no layer set it, so the job filled it in (smoke inputs)
            node = info.get_default(call_default_factory=True)
            if hasattr(node, "model_dump"):
                node = node.model_dump(mode="json")
            model = info.annotation if isinstance(info.annotation, type) else None
        elif isinstance(node, dict) and part in node:
            node, model = node[part], None
        else:
            return _UNKNOWN
    return node


_UNKNOWN, _REQUIRED = object(), object()


def annotated_yaml(data: dict[str, Any], sources: dict[str, str], model: Any = None) -> str:
    """The resolved config as YAML (it loads back to the same config), every value commented with where it
    came from: a layer of `sources` (the value's own path or a section above it), else "default" when it
    is `model`'s default and "derived" when the config computed it (smoke inputs, steps from a radius)."""
    import yaml

    def source(path: str, value: Any) -> str:
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            hit = sources.get(".".join(parts[:i]))
            if hit:
                return hit
        if model is None:
            return "default"
        default = _model_default(model, path)
        if default is _REQUIRED:
            return "derived"
        return "default" if default is _UNKNOWN or default == value else "derived"

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False)
        return text.removesuffix("\n...\n").strip()

    lines: list[str] = []

    def walk(node: dict[str, Any], prefix: str, indent: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            name = scalar(key)
            if isinstance(value, dict) and value:
                lines.append(f"{indent}{name}:")
                walk(value, path + ".", indent + "  ")
            else:
                lines.append(f"{indent}{name}: {scalar(value)}  # {source(path, value)}")

    walk(data, "", "")
    return "\n".join(lines) + "\n"


def resolve_job_config(spec: JobSpec, data: dict[str, Any], *, smoke: bool, make_inputs: bool, source: str):
    if smoke and spec.smoke_inputs is not None:
        data = spec.smoke_inputs(data, make_inputs)
    return validate_config(spec.config_class(), data, source)


def preflight(spec: JobSpec, cfg) -> None:
    """Fail before Ray starts when a weight file the job will read is missing (one error for all of them)."""
    models, lpips = required_weights(spec.name, cfg)
    if not models and not lpips:
        return
    from raypdm.models.preflight import check_models

    check_models(models, getattr(cfg, "weights_dir", None), lpips=lpips)


def run_job(name: str, data: dict[str, Any], *, smoke: bool = False, ctx: RunContext | None = None,
            source: str = "command line", print_config: bool = False,
            sources: dict[str, str] | None = None) -> JobResult | None:
    """Validate `data` as job `name`'s config, check its weights, and run it on Ray (started if needed)."""
    spec = get_job(name)
    ctx = ctx or RunContext()
    try:
        cfg = resolve_job_config(spec, data, smoke=smoke, make_inputs=False, source=source)
    except ConfigError as exc:
        raise JobAbort(str(exc)) from None
    if print_config:
        click.echo(annotated_yaml(cfg.model_dump(mode="json"), sources or {}, type(cfg)), nl=False)
        return None
    from raypdm.data.roots import RootOverlapError, check_apart, read_roots

    try:
        # Before anything starts: a command never writes into what it reads (raypdm/data/roots.py).
        if getattr(cfg, "output", None):
            check_apart(cfg.output, read_roots(cfg))
    except RootOverlapError as exc:
        raise JobAbort(str(exc)) from None
    try:
        preflight(spec, cfg)
    except FileNotFoundError as exc:  # MissingWeightsError and friends: names every file and the fetch command
        raise JobAbort(str(exc)) from None
    from raypdm.data.stores import StoreError, check_stores

    try:
        # Object stores before Ray starts: the inputs can be listed, the output bucket exists and takes a write
        # (a --smoke run makes its inputs itself, so only its output is checked).
        check_stores({} if smoke else read_roots(cfg), getattr(cfg, "output", None))
    except StoreError as exc:
        raise JobAbort(str(exc)) from None
    from raypdm.data.lock import OutputLockedError, hold_output
    from raypdm.data.manifest import run_scope

    with contextlib.ExitStack() as held:
        run_id = held.enter_context(run_scope())
        if getattr(cfg, "output", None):
            try:
                # One writer per output root, from before the first byte (smoke inputs included) and before Ray:
                # a second run into the same root exits here, naming the holder (raypdm/data/lock.py).
                held.enter_context(hold_output(cfg.output, run_id=run_id))
            except (OutputLockedError, ValueError) as exc:  # ValueError: a bad RAYPDM_LOCK_STALE_S
                raise JobAbort(str(exc)) from None
        return _run(spec, cfg, data, smoke=smoke, ctx=ctx)


def _run(spec: JobSpec, cfg, data: dict[str, Any], *, smoke: bool, ctx: RunContext) -> JobResult:
    from raypdm.runtime import init_ray, prefer_quiet
    from raypdm.ui import progress_enabled, set_progress

    quiet_before = prefer_quiet(not ctx.verbose)  # for Ray started later, by a job that starts it on demand
    before = progress_enabled()
    try:
        if spec.needs_ray and not spec.ray_on_demand:
            init_ray()
        if smoke and spec.smoke_inputs is not None:
            # Now write what the smoke run was missing (the paths were already in the validated config).
            spec.smoke_inputs(data, True)
        set_progress(ctx.progress)  # --no-progress: no bars, no training or trial lines, in every stage it runs
        return spec.run_function()(cfg, ctx)
    finally:
        set_progress(before)  # an in-process caller (a notebook, a test) gets its setting back
        prefer_quiet(quiet_before)
