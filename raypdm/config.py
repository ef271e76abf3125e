"""Typed job configs: pydantic models loaded from YAML, overridden from the command line.

Every job config is a `JobConfig`. A wrong key, type or value fails in `resolve_config` before any work
starts, with a `ConfigError` whose message names the field (`purifier.options.jpeg.quality: ...`).
Precedence, lowest first: model defaults < YAML file < explicit CLI flags < `--set a.b=value` overrides.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "StrictModel",
    "JobConfig",
    "resolve_config",
    "parse_overrides",
    "config_hash",
    "save_resolved_config",
]

C = TypeVar("C", bound="JobConfig")


class ConfigError(ValueError):
    """A config that cannot run. The message names every offending field."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class JobConfig(StrictModel):
    """A whole job's config. Subclasses add their sections and fields."""

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling and section)"
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {field}: {msg}{shown}")
    return "\n".join(lines)


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


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(uri: str) -> dict[str, Any]:
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


def resolve_config(
    cls: type[C],
    *,
    path: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> C:
    """Build a validated config from a YAML file, explicit CLI flags (None = not given) and overrides."""
    data: dict[str, Any] = _read_yaml(path) if path else {}
    source = path or "command line"
    if flags:
        data = _deep_merge(data, {k: v for k, v in flags.items() if v is not None})
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def config_hash(config: BaseModel | dict[str, Any], *, length: int = 16) -> str:
    """Stable hash of the fields that change outputs: canonical JSON, sorted keys."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def save_resolved_config(config: JobConfig, out_uri: str, name: str = "config.yaml") -> str:
    """Write the resolved config beside the run's outputs, so every result says how it was made."""
    from raypdm.data.uri import join, write_bytes

    target = join(out_uri, name)
    write_bytes(target, config.to_yaml().encode())
    return target
