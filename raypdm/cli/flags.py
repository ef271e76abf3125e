"""Command-line flags generated from a job's typed config, plus a few hand-named ones.

Every top-level field of a simple type becomes a flag named after it (`batch_size` -> `--batch-size`,
`chain_layout` -> `--chain-layout {fused,pools}`, a bool `faithfulness` -> `--faithfulness/
--no-faithfulness`, a list -> a comma-separated value), with the field's description as its help. Nested
sections stay reachable through `--set section.field=value` and YAML; the few nested settings people type
all the time get a hand-named `Flag` in the job table (`--steps` -> `train.steps`). A flag that is not
given is `None` and leaves the lower layers (defaults, YAML, smoke) alone.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import click
from pydantic import BaseModel

__all__ = ["Flag", "config_flags", "flag_values", "set_path"]


@dataclass(frozen=True)
class Flag:
    """A hand-named flag: `--name VALUE` sets the config field(s) at `paths` (dotted)."""

    name: str
    paths: tuple[str, ...]
    help: str = ""
    type: Any = None  # a click type; None = string
    is_flag: bool = False  # `--ddp`: sets `value` when given
    value: Any = None
    multiple: bool = False  # repeatable, collected into a list
    convert: Callable[[Any], Any] | None = None
    metavar: str | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def dest(self) -> str:
        return "flag_" + self.name.lstrip("-").replace("-", "_")

    def option(self) -> Callable:
        decls = [self.name, *self.aliases, self.dest]
        if self.is_flag:
            return click.option(*decls, is_flag=True, default=None, help=self.help)
        return click.option(*decls, type=self.type, default=None, multiple=self.multiple, help=self.help,
                            metavar=self.metavar)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without `None`, whether None is allowed); Annotated metadata dropped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            inner, _ = _unwrap(args[0])
            return inner, optional
        return typing.Union[tuple(args)], optional  # noqa: UP007 (a runtime union of several members)
    return annotation, False


def _scalar_type(tp: Any) -> Any | None:
    """A click type for a scalar annotation, or None when the field is not a simple scalar."""
    if tp is bool:
        return bool
    if tp in (int, float, str):
        return {int: click.INT, float: click.FLOAT, str: click.STRING}[tp]
    if typing.get_origin(tp) is Literal:
        values = typing.get_args(tp)
        if all(isinstance(v, str) for v in values):
            return click.Choice(list(values))
    return None


def _field_kind(annotation: Any) -> tuple[str, Any] | None:
    """('scalar', click type) | ('list', item converter) | ('choice-or-list', ...) | None (not a flag)."""
    tp, _ = _unwrap(annotation)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        # `list[str] | Literal["all"]` and the like: the value is passed through as typed (the config's own
        # validator parses "a,b" and "all").
        members = typing.get_args(tp)
        if all(_scalar_type(m) is not None or typing.get_origin(m) is list for m in members):
            return "raw", click.STRING
        return None
    if origin is list:
        (item,) = typing.get_args(tp) or (str,)
        item, _ = _unwrap(item)
        if item in (str, int, float) or typing.get_origin(item) is Literal:
            return "list", item
        return None
    scalar = _scalar_type(tp)
    return ("scalar", scalar) if scalar is not None else None


def _split_list(raw: str, item: Any) -> list[Any]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if item in (int, float):
        try:
            return [item(p) for p in parts]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {item.__name__}s, got {raw!r}") from None
    return parts


# Help for fields that many configs share and that need no description of their own.
_COMMON_HELP = {
    "preset": "tiny: random-weight models built from configs (tests, smoke runs); full: the real architectures",
    "weights_dir": "folder with one <model>/ subfolder per model (raypdm models fetch --weights-dir W)",
    "batch_size": "images per batch on the device",
    "workers": "actors in the model pool",
    "gpus_per_worker": "GPUs per actor (fractions pack several actors per GPU)",
    "identities": "comma-separated identity folder names, or 'all'",
    "seed": "base seed",
}


def _default_text(info) -> str:
    if info.is_required():
        return " [required]"
    default = info.get_default(call_default_factory=True)
    if default is None or default == [] or isinstance(default, (dict, BaseModel)):
        return ""
    if isinstance(default, list):
        default = ",".join(map(str, default))
    text = str(default)
    return f" [{text}]" if len(text) < 40 else ""


def config_flags(config: type[BaseModel], hand: tuple[Flag, ...] = (), skip: tuple[str, ...] = ()) -> list[Callable]:
    """click option decorators for `config`'s simple top-level fields, then the hand-named flags."""
    taken = {f.name for f in hand} | {a for f in hand for a in f.aliases}
    # A hand-named flag for a top-level field replaces the generated one (`--lpips` for lpips_backbone).
    covered = {f.paths[0] for f in hand if len(f.paths) == 1 and "." not in f.paths[0]}
    options = []
    for name, info in config.model_fields.items():
        if name in skip or name in covered:
            continue
        kind = _field_kind(info.annotation)
        flag = "--" + name.replace("_", "-")
        if kind is None or flag in taken:
            continue
        help_text = ((info.description or _COMMON_HELP.get(name, "")) + _default_text(info)).strip()
        help_text = help_text.replace("%", "%%")
        dest = "field_" + name
        if kind[0] == "scalar" and kind[1] is bool:
            options.append(click.option(f"{flag}/--no-{flag[2:]}", dest, default=None, help=help_text))
        elif name == "identities":
            options.append(click.option(flag, dest, default=None, metavar="A,B|all", help=help_text))
        elif kind[0] == "list":
            item = kind[1]
            what = "comma-separated " + ("values" if typing.get_origin(item) is Literal else f"{item.__name__}s")
            if typing.get_origin(item) is Literal:
                what += f" from {', '.join(map(str, typing.get_args(item)))}"
            options.append(click.option(flag, dest, default=None, metavar="A,B",
                                        help=f"{help_text} ({what})".strip()))
        else:
            options.append(click.option(flag, dest, type=kind[1], default=None, help=help_text))
    return options + [f.option() for f in hand]


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def flag_values(config: type[BaseModel], hand: tuple[Flag, ...], params: dict[str, Any]) -> dict[str, Any]:
    """The nested flags layer from click's parsed parameters (only the flags that were given)."""
    data: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        raw = params.get("field_" + name)
        if raw is None:
            continue
        kind = _field_kind(info.annotation)
        if kind and kind[0] == "list" and name != "identities":  # the config parses "a,b" / "all" itself
            raw = _split_list(raw, kind[1])
        data[name] = raw
    for f in hand:
        raw = params.get(f.dest)
        if raw is None or (f.multiple and not raw):
            continue
        value = f.value if f.is_flag else (list(raw) if f.multiple else raw)
        if f.convert is not None:
            value = f.convert(value)
        for path in f.paths:
            set_path(data, path, value)
    return data
