"""Click options generated from settings models, so a setting is declared once (type, default,
description, ``EDGESERVE_*`` variable) and the command line follows it."""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)
if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    _ParamType = click.ParamType[Any]  # generic in click 8.2+; a plain class before
else:
    _ParamType = click.ParamType
D = TypeVar("D", bound="DataclassInstance")


def _click_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is_flag) for a field annotation; Optional[X] is X."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if annotation is bool:
        return bool, True
    if annotation is Path:
        return click.Path(path_type=Path), False
    if annotation in (int, float, str):
        return annotation, False
    return str, False


def env_name(model: type[BaseModel], name: str) -> str:
    return f"{model.model_config.get('env_prefix', '')}{name.upper()}"


def _default_text(field: FieldInfo) -> str:
    """The default as help shows it; a computed default (threads, cache_dir) is described by its
    field's own text instead, since it differs per machine."""
    if field.default is PydanticUndefined or field.default is None or field.default == "":
        return ""
    if isinstance(field.default, bool):
        return f"[default: {'on' if field.default else 'off'}]"
    return f"[default: {field.default}]"


def options_from(model: type[BaseModel], *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Add one ``--flag`` per field of ``model`` (but those in ``exclude``). Unset flags stay None
    so that environment variables and the model's defaults apply (see ``build``)."""
    skip = set(exclude)
    unknown = skip - set(model.model_fields)
    if unknown:  # a renamed field would otherwise quietly reappear on a command that hid it
        raise ValueError(f"{model.__name__} has no field {', '.join(sorted(unknown))}")

    def decorate(fn: F) -> F:
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            kind, is_flag = _click_type(field.annotation)
            flag = "--" + name.replace("_", "-")
            help_text = " ".join(p for p in (field.description or "", _default_text(field)) if p)
            help_text += f" [env {env_name(model, name)}]"
            decls = [f"{flag}/--no-{name.replace('_', '-')}"] if is_flag else [flag]
            fn = click.option(*decls, name, type=None if is_flag else kind, default=None, help=help_text)(fn)
        return fn

    return decorate


def _source(model: type[BaseModel], name: str, given: dict[str, Any]) -> str:
    """Where a field's bad value came from: its flag, or its environment variable."""
    flag = "--" + name.replace("_", "-")
    if given.get(name) is not None:
        return flag
    env = env_name(model, name)
    # pydantic-settings matches variable names case-insensitively by default.
    value = next((v for k, v in os.environ.items() if k.upper() == env), None)
    if value is not None:
        return f"environment variable {env}={value!r}"
    return flag


def build(model: type[M], values: dict[str, Any]) -> M:
    """Instantiate settings from the flags that were given (popping them from ``values``); a bad
    value is reported against where it came from, a flag or an ``EDGESERVE_*`` variable."""
    given = {name: values.pop(name) for name in list(values) if name in model.model_fields}
    try:
        return model(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = [str(p) for p in e["loc"]]
            where = _source(model, loc[0], given) if loc and loc[0] in model.model_fields else ".".join(loc)
            problems.append(f"{where}: {e['msg']}")
        raise click.UsageError("; ".join(problems)) from None


# ---- flags from a frozen dataclass (SamplingParams) ---------------------------------------------


class _JsonObject(_ParamType):
    """A JSON object with integer keys (``--logit-bias '{"123": 5}'``), as OpenAI sends logit_bias."""

    name = "json"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError("not an object")
            return {int(k): float(v) for k, v in parsed.items()}
        except (ValueError, TypeError) as exc:
            self.fail(f"expected a JSON object of token id to number, like '{{\"123\": 5}}' ({exc})", param, ctx)


class _OrNone(_ParamType):
    """A number, or ``none`` for a field whose None means 'no limit' (``--max-tokens none``)."""

    def __init__(self, inner: type[int] | type[float]) -> None:
        self.inner = inner
        self.name = f"{inner.__name__}|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        try:
            return self.inner(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid {self.inner.__name__} (or 'none')", param, ctx)


def _dataclass_option(name: str, annotation: Any, field: dataclasses.Field[Any]) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    help_text = str(field.metadata.get("help", ""))
    has_default = field.default is not dataclasses.MISSING
    default = field.default if has_default else None
    optional = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    inner = [a for a in typing.get_args(annotation) if a is not type(None)] if optional else [annotation]
    base, origin = inner[0], typing.get_origin(inner[0])
    if base is bool:
        return click.option(flag, name, is_flag=True, default=bool(default), help=help_text)
    if origin is tuple:  # a repeatable option: tuple[str, ...]
        (item,) = {a for a in typing.get_args(base) if a is not Ellipsis}
        return click.option(flag, name, type=item, multiple=True, help=help_text)
    if origin in (dict, collections.abc.Mapping):
        return click.option(flag, name, type=_JsonObject(), default=None, help=help_text)
    kind: Any = _OrNone(base) if optional and default is not None else base
    shown = has_default and default is not None
    return click.option(flag, name, type=kind, default=default, show_default=shown, help=help_text)


def options_from_dataclass(cls: type[Any], *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """One ``--flag`` per field of a dataclass whose fields carry ``metadata={"help": ...}``;
    defaults are the dataclass's own (``dataclass_from`` builds it back)."""
    skip = set(exclude)
    hints = typing.get_type_hints(cls)

    def decorate(fn: F) -> F:
        for field in reversed(dataclasses.fields(cls)):
            if field.name not in skip:
                fn = _dataclass_option(field.name, hints[field.name], field)(fn)
        return fn

    return decorate


def dataclass_from(cls: type[D], values: dict[str, Any]) -> D:
    """Build ``cls`` from the flags ``options_from_dataclass`` made (popping them from ``values``).
    A flag left unset whose default comes from a factory (``logit_bias``) is left to the factory."""
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value = values.pop(field.name)
        if value is None and field.default is dataclasses.MISSING:
            continue
        kwargs[field.name] = value
    return cls(**kwargs)
