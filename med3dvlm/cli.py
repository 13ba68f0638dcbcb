"""Command lines: ``key=value`` parsing for the demo and the app, and how every command reports mistakes.

The demo and the app take the same ``key=value`` syntax as the Hydra entry points
(``model_dir=... image=...``) but start in a second, since they compose no config. A mistake
(unknown key, missing value, bad number) is a :class:`UsageError`: the entry point prints it with
the usage and exits with status 2, never with a traceback.

Every command (train, eval, prepare, export, demo) runs its ``main`` through :func:`reports_mistakes`:
a user's mistake (a missing or unreadable file, an unknown key, a bad value) prints
``error: <one line>`` and exits with status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USAGE_EXIT_CODE = 2  # as argparse: the command line (or the user's input) is wrong
# Separator of the items of a list value: texts="a|b|c", choices="...". Reports hold no "|".
LIST_SEPARATOR = "|"


class UsageError(ValueError):
    """A command-line mistake, reported as a message (exit status 2)."""


@dataclass(frozen=True)
class Option:
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    required: bool = False


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_list(text: str) -> list[str]:
    """``"a|b|c"`` -> three items; ``"@file.txt"`` -> the file's non-blank lines."""
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ValueError(f"{path} not found (a list given as @FILE is read one item per line)")
        items = path.read_text(encoding="utf-8").splitlines()
    else:
        items = text.split(LIST_SEPARATOR)
    return [item.strip() for item in items if item.strip()]


def parse_key_values(argv: Sequence[str], options: dict[str, Option]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: parsed v}`` for every option, defaults filled in."""
    values: dict[str, Any] = {}
    for argument in argv:
        key, equals, raw = argument.partition("=")
        key = key.strip().lstrip("+")  # "+key=value" as Hydra users type it
        if not equals:
            raise UsageError(f"expected key=value, got {argument!r}")
        if key not in options:
            raise UsageError(f"unknown key {key!r}; known keys: {', '.join(options)}")
        try:
            values[key] = options[key].parse(raw)
        except ValueError as error:
            raise UsageError(f"{key}={raw!r}: {error}") from None
    missing = [key for key, option in options.items() if option.required and key not in values]
    if missing:
        raise UsageError(f"missing {', '.join(f'{key}=...' for key in missing)}")
    return {key: values.get(key, option.default) for key, option in options.items()}


def usage(program: str, options: dict[str, Option]) -> str:
    lines = [f"usage: python -m {program} " + " ".join(f"{k}=..." for k, o in options.items() if o.required), ""]
    for key, option in options.items():
        default = "" if option.required or option.default in (None, "") else f" (default: {option.default})"
        lines.append(f"  {key:<16} {option.help}{default}")
    return "\n".join(lines)


def wants_help(argv: Sequence[str]) -> bool:
    return any(argument in ("-h", "--help", "help") for argument in argv)


def fail(message: str, program: str | None = None, options: dict[str, Option] | None = None) -> int:
    """Prints ``error: message`` (and the usage) to stderr; returns the exit status."""
    print(f"error: {message}", file=sys.stderr)
    if program and options:
        print(usage(program, options), file=sys.stderr)
    return USAGE_EXIT_CODE


# Hydra's switch: "1" = every error raised with its traceback (and Hydra's own reports too).
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
# Lines of OmegaConf's messages that locate a key in Python terms (the key is named already), and
# where Hydra's list of config search paths starts.
_DETAIL_PREFIXES = ("full_key:", "object_type=", "reference_type=")
_SEARCH_PATH = "Config search path:"
# The user's HYDRA_FULL_ERROR while _hydra_raises has set it (None: not in force).
_users_full_error: list[str | None] | None = None


class _MistakeExit(SystemExit):
    """Ends a command after its mistake was reported: Hydra lets a SystemExit through untouched."""


def full_errors_wanted() -> bool:
    """True when the user asked for tracebacks (``HYDRA_FULL_ERROR=1``)."""
    value = os.environ.get(FULL_ERROR_ENV) if _users_full_error is None else _users_full_error[0]
    return value == "1"


def user_mistake(error: BaseException) -> BaseException | None:
    """The mistake a user can fix that ``error`` reports, or None for anything else (a bug: traceback).

    ``ValueError`` (``DataError``, ``UsageError``, ``CheckpointError``, ...) and ``FileNotFoundError``
    are what the project raises for bad input; Hydra's composition errors are command-line mistakes;
    a constructor's complaint arrives wrapped in Hydra's ``InstantiationException``.
    """
    from hydra.errors import ConfigCompositionException, InstantiationException, OverrideParseException
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        return user_mistake(error.__cause__)
    mistakes = (ValueError, FileNotFoundError, ConfigCompositionException, OverrideParseException)
    return error if isinstance(error, (*mistakes, MissingMandatoryValue)) else None


def one_line(text: str) -> str:
    """A multi-line message (Hydra's, OmegaConf's) as one line: indented lists joined by commas."""
    parts: list[str] = []
    for raw in text.split(_SEARCH_PATH)[0].splitlines():
        line = raw.strip()
        if not line or line.startswith(_DETAIL_PREFIXES):
            continue
        if parts and parts[-1].endswith(":"):
            parts[-1] += " " + line
        elif parts and raw[:1].isspace():
            parts[-1] += ", " + line
        else:
            parts.append(line)
    return "; ".join(part.rstrip(".") if i < len(parts) - 1 else part for i, part in enumerate(parts))


def describe_mistake(error: BaseException, program: str | None = None) -> str:
    """What went wrong, where, and what to do, on one line."""
    from hydra.errors import CompactHydraException, ConfigCompositionException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

    cause = error.__cause__
    if isinstance(error, MissingMandatoryValue) and error.full_key:
        return f"{error.full_key} is required: add {error.full_key}=... to the command line"
    if isinstance(error, ConfigCompositionException) and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        key = cause.full_key or "?"
        listing = f"`python -m {program} --cfg job` lists the keys" if program else "`--cfg job` lists the keys"
        return f"unknown key {key!r} on the command line: {listing} (+{key}=... adds a new one)"
    if isinstance(error, OverrideParseException):
        return f"cannot read {error.override!r} on the command line: {one_line(error.message)}"
    text = str(error) or type(error).__name__
    if isinstance(error, CompactHydraException) and isinstance(cause, OmegaConfBaseException):
        text += "\n" + str(cause)
    return one_line(text)


def _restore_users_full_error() -> None:
    global _users_full_error
    if _users_full_error is not None:
        value = _users_full_error[0]
        if value is None:
            os.environ.pop(FULL_ERROR_ENV, None)
        else:
            os.environ[FULL_ERROR_ENV] = value
        _users_full_error = None


@contextmanager
def _hydra_raises() -> Iterator[None]:
    """Hydra prints a command-line mistake itself (several lines, exit status 1); told
    HYDRA_FULL_ERROR=1 it raises it instead, to be reported like any other. The job itself runs
    with the user's setting again (:func:`reporting_mistakes`), as do the processes it starts."""
    global _users_full_error
    _users_full_error = [os.environ.get(FULL_ERROR_ENV)]
    os.environ[FULL_ERROR_ENV] = "1"
    try:
        yield
    finally:
        _restore_users_full_error()


@contextmanager
def _mistakes_reported(program: str | None) -> Iterator[None]:
    if full_errors_wanted():
        yield
        return
    try:
        yield
    except Exception as error:  # only a user's mistake is reported, the rest re-raised
        mistake = user_mistake(error)
        if mistake is None:
            raise
        fail(describe_mistake(mistake, program))
        raise _MistakeExit(USAGE_EXIT_CODE) from None


@contextmanager
def reporting_mistakes() -> Iterator[None]:
    """For the body of a ``@hydra.main`` function (under :func:`reports_mistakes`): a user's mistake
    prints ``error: <one line>`` to stderr and ends the command with status 2, before Hydra adds a
    report of its own; any other error, or every error under ``HYDRA_FULL_ERROR=1``, raises as usual.
    The job runs with the user's HYDRA_FULL_ERROR again, as do the processes it starts (DDP ranks)."""
    _restore_users_full_error()
    with _mistakes_reported(None):
        yield


def reports_mistakes(program: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorates a command's ``main`` (above ``@hydra.main``, or an argv function): a user's mistake,
    on the command line or in the input, prints ``error: <one line>`` to stderr and ``main`` returns
    :data:`USAGE_EXIT_CODE`; otherwise ``main``'s own result (0 for None), so that
    ``raise SystemExit(main())`` ends the process with the right status. Any other error, or every
    error under ``HYDRA_FULL_ERROR=1``, raises as usual."""

    def decorate(main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                with _hydra_raises(), _mistakes_reported(program):
                    result = main(*args, **kwargs)
            except _MistakeExit as reported:
                return reported.code
            return 0 if result is None else result

        return run

    return decorate
