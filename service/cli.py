"""The command line of ``python -m service``, generated from the settings model.

Every field of :class:`~service.settings.Settings` is a flag (``max_batch_size`` ->
``--max-batch-size``, a boolean ``--x`` / ``--no-x``) whose help shows the field's description,
default and environment variable, so a setting added to the model is on the command line, in
``--help`` and in ``--print-settings`` with nothing else to write. A flag wins over its variable,
which wins over the default.

:func:`read_configuration` also refuses what would otherwise be silent: a ``COGALORA_*`` variable
that is no setting (a typo such as ``COGALORA_APIKEY`` would leave the service open) and an invalid
value. :func:`check_startup` then checks what needs no model loading: the model directory and the
device. Each problem is a :class:`StartupError` whose message is one line naming it and the fix.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from service.settings import ENV_PREFIX, OTHER_VARIABLES, Settings

PROG = "python -m service"
MASK = "********"


class StartupError(Exception):
    """A configuration problem found before serving; the message names the problem and the fix."""


@dataclass(frozen=True)
class Configuration:
    settings: Settings
    sources: dict[str, str]
    """Field -> where its value came from: ``default``, ``env COGALORA_X`` or ``flag --x``."""
    print_settings: bool


def flag(name: str) -> str:
    """The command-line flag of the settings field ``name``."""
    return "--" + name.replace("_", "-")


def _optional_inner(annotation: Any) -> Any:
    """``X | None`` -> ``X`` (other annotations unchanged)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_complex(annotation: Any) -> bool:
    """Values given as JSON, as pydantic-settings reads them from the environment (lists, dicts, models)."""
    inner = _optional_inner(annotation)
    origin = typing.get_origin(inner) or inner
    return origin in (list, tuple, set, frozenset, dict) or (isinstance(origin, type) and issubclass(origin, BaseModel))


def _is_secret(field: FieldInfo) -> bool:
    return _optional_inner(field.annotation) is SecretStr


def _shown(value: Any) -> str:
    """A value as its environment variable would spell it (secrets masked)."""
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, BaseModel | list | tuple | set | frozenset | dict):
        return json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value, default=str)
    return str(value)


def _help(name: str, field: FieldInfo) -> str:
    default = _shown(field.get_default(call_default_factory=True)) or "unset"
    text = f"{(field.description or '').rstrip('.')}. [default: {default}; env {Settings.variable(name)}]"
    return text.lstrip(". ").replace("%", "%%")


def build_parser(model: type[Settings] = Settings) -> argparse.ArgumentParser:
    """The parser of ``python -m service``: one flag per field of ``model``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve CoGaLoRA text classifiers over HTTP: every checkpoint folder of the model directory "
        "is one adapter. Each setting below is a flag and a COGALORA_* environment variable; a flag wins over "
        "its variable, which wins over the default.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--print-settings",
        action="store_true",
        help="Print the effective settings (as COGALORA_* variables, secrets masked) and where each came from "
        "(flag, env or default), then exit.",
    )
    group = parser.add_argument_group("settings")
    for name, field in model.model_fields.items():
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(name, field)}
        annotation = _optional_inner(field.annotation)
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            options["choices"] = [str(choice) for choice in typing.get_args(annotation)]
        else:
            options["metavar"] = _metavar(annotation)
        group.add_argument(flag(name), **options)
    return parser


def _metavar(annotation: Any) -> str:
    if _is_complex(annotation):
        return "JSON"
    return {int: "N", float: "X", Path: "PATH"}.get(annotation, "TEXT")


def unknown_variables(environ: Mapping[str, str], model: type[Settings] = Settings) -> list[str]:
    """One message per ``COGALORA_*`` variable that is no setting, with the closest setting's name."""
    known = {model.variable(name) for name in model.model_fields}
    problems = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known | OTHER_VARIABLES:
            continue
        suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
        close = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.6)
        guess = f" (did you mean {suffixes[close[0]]}?)" if close else ""
        problems.append(f"unknown environment variable {variable}{guess}")
    return problems


def read_configuration(argv: list[str] | None = None, model: type[Settings] = Settings) -> Configuration:
    """The settings from flags (``argv``), ``COGALORA_*`` variables and defaults, with their sources.

    Raises :class:`StartupError` for unknown variables and invalid values; argparse itself exits
    with status 2 on a malformed command line.
    """
    args = vars(build_parser(model).parse_args(argv))
    problems = unknown_variables(os.environ, model)
    if problems:
        raise StartupError(f"{'; '.join(problems)}: rename or unset it ({PROG} --help lists every setting)")
    fields = model.model_fields
    flags = {name: value for name, value in args.items() if name in fields}
    for name, value in flags.items():
        if isinstance(value, str) and _is_complex(fields[name].annotation):
            try:
                flags[name] = json.loads(value)
            except ValueError:
                raise StartupError(f"invalid setting {flag(name)}: not valid JSON") from None
    try:
        settings = model(**flags)
    except ValidationError as exc:
        raise StartupError(_invalid(exc, model, flags)) from None
    except SettingsError as exc:  # a variable pydantic-settings could not decode (e.g. malformed JSON)
        raise StartupError(f"invalid setting: {exc}") from None
    environment = {key.upper() for key in os.environ}
    sources = {}
    for name in fields:
        if name in flags:
            sources[name] = f"flag {flag(name)}"
        elif model.variable(name) in environment:
            sources[name] = f"env {model.variable(name)}"
        else:
            sources[name] = "default"
    return Configuration(settings=settings, sources=sources, print_settings=bool(args.get("print_settings")))


def _invalid(exc: ValidationError, model: type[Settings], flags: dict[str, Any]) -> str:
    """One line for a ValidationError: which setting, from where, what is wrong, and the value given."""
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        field = model.model_fields.get(name)
        where = flag(name) if name in flags else model.variable(name)
        message = str(error["msg"]).removeprefix("Value error, ")
        given = str(error.get("input"))[:64]
        value = "" if field is None or _is_secret(field) or repr(given) in message else f" (got {given!r})"
        parts.append(f"{where}: {message}{value}")
    return f"invalid setting {'; '.join(parts)}; {PROG} --help describes each setting"


def describe_settings(configuration: Configuration) -> str:
    """The effective settings as ``COGALORA_X=value  # source`` lines, secrets masked."""
    settings = configuration.settings
    lines = []
    for name in type(settings).model_fields:
        value = _shown(getattr(settings, name))
        lines.append(f"{settings.variable(name)}={shlex.quote(value)}  # {configuration.sources[name]}")
    return "\n".join(lines)


def check_startup(settings: Settings) -> None:
    """What needs no model loading: a folder of checkpoints and a usable device (imports torch)."""
    from service.catalogue import check_model_dir

    try:
        check_model_dir(settings.model_dir, allow_empty=settings.allow_empty_model_dir)
    except OSError as exc:
        raise StartupError(str(exc) if not exc.filename else f"model directory: {exc}") from None
    except ValueError as exc:
        raise StartupError(str(exc)) from None
    check_device(settings.resolved_device())


def check_device(device: str) -> None:
    """Allocate on ``device`` once, so an unusable one fails here with a message, not in the background."""
    import torch

    try:
        torch.empty(1, device=torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(
            f"device {device!r} cannot be used ({reason}; torch {torch.__version__}): "
            "use --device cpu (COGALORA_DEVICE=cpu), or auto to take a GPU only when there is one"
        ) from None
