"""Typed job configs: pydantic models loaded from YAML, overridden from the command line.

Every job config is a `JobConfig`. A wrong key, type or value fails in `resolve_config` before any work
starts, with a `ConfigError` whose message names the full field path (`options.jpeg.quality: ...`,
`distributed.zero_stage: ...`), also for sections validated by a component's own options model
(`validate_section`). Precedence, lowest first: model defaults < YAML file < the job's smoke settings
(`--smoke`) < explicit CLI flags < `--set a.b=value` overrides.

Paths are normalised once, here: every field typed `Uri` becomes an absolute local path or keeps its
scheme (`s3://`, `gs://`, `file:///`), resolved against the working directory of the process that reads
the config, before any Ray worker (which has another working directory, maybe on another node) sees it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

__all__ = [
    "ConfigError",
    "SectionError",
    "StrictModel",
    "JobConfig",
    "Uri",
    "Identities",
    "parse_identities",
    "validate_section",
    "resolve_config",
    "validate_config",
    "merge_layers",
    "parse_overrides",
    "read_yaml",
    "deep_merge",
    "config_hash",
    "save_resolved_config",
]

C = TypeVar("C", bound="JobConfig")


class ConfigError(ValueError):
    """A config that cannot run. The message names every offending field."""


class SectionError(ValueError):
    """A nested section that failed its own options model (a purifier's, a protection's): carries the
    inner errors so the message names the full path (`options.sr.noise_level`), not the outer model."""

    def __init__(self, prefix: tuple[str | int, ...], error: ValidationError):
        self.prefix, self.error = tuple(prefix), error
        super().__init__("; ".join(f"{'.'.join(map(str, (*prefix, *e['loc'])))}: {e['msg']}" for e in error.errors()))


def validate_section(model: type[BaseModel], data: Any, *prefix: str | int) -> BaseModel:
    """`model.model_validate(data)`, with errors that keep `prefix` (use inside a config's validators)."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise SectionError(prefix, err) from None


def _normalise(value: str) -> str:
    from raypdm.data.uri import UriError, normalise_uri

    try:
        return normalise_uri(value)
    except UriError as exc:
        raise ValueError(str(exc)) from None


# A path or URI a user gives: absolute after validation (see the module docstring).
Uri = Annotated[str, AfterValidator(_normalise)]


def parse_identities(value: Any) -> list[str] | None:
    """`--identities` means one thing on every command: `all` (or nothing) = every identity found, else a
    comma-separated list (or a YAML list) of identity folder names, each a safe path component."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() in ("", "all"):
            return None
        value = [v for v in value.split(",")]
    if not isinstance(value, (list, tuple)):
        raise ValueError("expected 'all', a comma-separated list or a list of identity names")
    names = [str(v).strip() for v in value if str(v).strip()]
    if not names:
        raise ValueError("give at least one identity, or 'all'")
    if [n for n in names if n.lower() == "all"]:
        return None if len(names) == 1 else _fail("'all' cannot be combined with named identities")
    from raypdm.data.layout import LayoutError, validate_component

    for name in names:
        try:
            validate_component(name, "identity")
        except LayoutError as exc:
            raise ValueError(str(exc)) from None
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"identities listed twice: {twice}")
    return names


def _fail(message: str):
    raise ValueError(message)


# None = every identity under the input; a list = exactly those (validated, no duplicates).
Identities = Annotated[list[str] | None, BeforeValidator(parse_identities)]


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class JobConfig(StrictModel):
    """A whole job's config. Subclasses add their sections and fields."""

    protocol: Literal["paper", "official-code"] = Field(
        "paper", description="paper: the paper's text; official-code: what its public code ran "
                             "(raypdm/protocols.py; explicit settings override it)")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _error_lines(err: ValidationError, prefix: tuple = ()) -> list[str]:
    lines = []
    for e in err.errors():
        inner = (e.get("ctx") or {}).get("error")
        if isinstance(inner, SectionError):
            # A component's own options model failed: report its errors at their full path.
            lines += _error_lines(inner.error, (*prefix, *e["loc"], *inner.prefix))
            continue
        loc = (*prefix, *e["loc"])
        # Union members add their type name to the path (`identities.list[str]`); users never typed it.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "float"))))
        field = ".".join(str(p) for p in loc) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and section)"
        got = e.get("input")
        quiet = e["type"] == "extra_forbidden" or isinstance(got, (dict, list)) or repr(got) in msg
        shown = "" if quiet else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return list(dict.fromkeys(lines))


def _format_validation_error(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid config ({source}):", *_error_lines(err)])


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn `["a.b=1", "c=[x, y]"]` into a nested dict. Values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected KEY=VALUE, e.g. batch_size=8")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r}: empty field name")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is both a value and a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_deep_merge = deep_merge  # older name, kept for callers outside the front door


def read_yaml(uri: str) -> dict[str, Any]:
    import fsspec

    try:
        with fsspec.open(uri, "r") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {uri}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {uri} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri}: expected a mapping of fields, got {type(data).__name__}")
    return data


_read_yaml = read_yaml


def merge_layers(
    *,
    yaml_data: dict[str, Any] | None = None,
    smoke: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The config's raw data from its layers, lowest first: YAML < smoke < flags (None = not given) < --set.

    A YAML file may hold a `smoke:` mapping; it is removed here and belongs in `smoke` (the caller
    decides whether `--smoke` was given)."""
    data = dict(yaml_data or {})
    data.pop("smoke", None)
    if smoke:
        data = deep_merge(data, smoke)
    if flags:
        data = deep_merge(data, {k: v for k, v in flags.items() if v is not None})
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return data


def validate_config(cls: type[C], data: dict[str, Any], source: str = "command line") -> C:
    """`cls.model_validate(data)` with every error named by its full field path (a `ConfigError`)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def resolve_config(
    cls: type[C],
    *,
    path: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> C:
    """Build a validated config from a YAML file, explicit CLI flags (None = not given) and overrides."""
    data = merge_layers(yaml_data=read_yaml(path) if path else {}, flags=flags, overrides=overrides)
    return validate_config(cls, data, path or "command line")


def config_hash(config: BaseModel | dict[str, Any], *, length: int = 16) -> str:
    """Stable hash of the fields that change outputs: canonical JSON, sorted keys."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def save_resolved_config(config: JobConfig, out_uri: str, name: str = "config.yaml") -> str:
    """Write the resolved config beside the run's outputs, so every result says how it was made."""
    from raypdm.data.uri import join, write_bytes

    from raypdm.data.manifest import current_run_id
    from raypdm.data.roots import check_inside

    target = join(out_uri, name)
    check_inside(out_uri, target)  # a planted link is not written through
    run_id = current_run_id()
    # A comment, so the file still loads as a config (`--config OUT/config.yaml` repeats the run).
    header = f"# run_id: {run_id}  (the manifest rows this run wrote carry the same id)\n" if run_id else ""
    write_bytes(target, (header + config.to_yaml()).encode())
    return target
