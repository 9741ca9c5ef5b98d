"""Click options generated from settings models, so a setting is declared once (type, default,
description, ``EDGESERVE_*`` variable) and the command line follows it."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)


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


def options_from(model: type[BaseModel], *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Add one ``--flag`` per field of ``model``. Unset flags stay None so that environment
    variables and the model's defaults apply (see ``build``)."""
    skip = set(exclude)

    def decorate(fn: F) -> F:
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            kind, is_flag = _click_type(field.annotation)
            flag = "--" + name.replace("_", "-")
            env = f"{model.model_config.get('env_prefix', '')}{name.upper()}"
            help_text = f"{field.description or ''} [env {env}]"
            decls = [f"{flag}/--no-{name.replace('_', '-')}"] if is_flag else [flag]
            fn = click.option(*decls, name, type=None if is_flag else kind, default=None, help=help_text)(fn)
        return fn

    return decorate


def build(model: type[M], values: dict[str, Any]) -> M:
    """Instantiate settings from the flags that were given (popping them from ``values``)."""
    given = {name: values.pop(name) for name in list(values) if name in model.model_fields}
    try:
        return model(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in exc.errors()
        )
        raise click.UsageError(problems) from None
