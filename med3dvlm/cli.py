"""Command lines: the one style of every ``python -m med3dvlm.<verb>``, and how mistakes are reported.

Every command is a Hydra application (:func:`hydra_command`): ``key=value`` overrides on its config
in ``configs/<verb>.yaml``, ``--help`` for its usage and keys, ``--cfg job`` for the composed config.
A user's mistake (a missing or unreadable file, an unknown key, a bad value) prints
``error: <one line>`` and exits with status 2, never with a traceback; ``HYDRA_FULL_ERROR=1`` shows
the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

USAGE_EXIT_CODE = 2  # as argparse: the command line (or the user's input) is wrong
# Separator of the items of a list value: texts="a|b|c", choices="...". Reports hold no "|".
LIST_SEPARATOR = "|"
# Where every command's config lives (configs/ of the repository, shipped as med3dvlm.configs).
CONFIG_PATH = "pkg://med3dvlm.configs"
HYDRA_VERSION_BASE = "1.3"


class UsageError(ValueError):
    """A command-line mistake, reported as a message (exit status 2)."""


def list_value(value: str | Sequence[Any] | None, key: str = "value") -> list[str] | None:
    """A list given on the command line: ``"a|b|c"``, ``"@file.txt"`` (one item per non-blank
    line) or a Hydra list ``[a, b, c]``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.startswith("@"):
            path = Path(value[1:])
            if not path.is_file():
                raise UsageError(f"{key}={value}: {path} not found (a list given as @FILE is read one item per line)")
            items = path.read_text(encoding="utf-8").splitlines()
        else:
            items = value.split(LIST_SEPARATOR)
    else:
        items = [str(item) for item in value]
    return [item.strip() for item in items if item.strip()]


def number(settings: Any, key: str, kind: type) -> Any:
    """``settings[key]`` as ``kind`` (int, float), or a UsageError naming the key; None stays None.
    Hydra keeps ``k=many`` as text, so a command's numbers are checked before they are used."""
    value = settings[key]
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"{key}={value!r}: expected {'an integer' if kind is int else 'a number'}") from None


def fail(message: str) -> int:
    """Prints ``error: message`` to stderr; returns the exit status."""
    print(f"error: {message}", file=sys.stderr)
    return USAGE_EXIT_CODE


def exit_status(code: Any) -> int:
    """The process status ``SystemExit(code)`` gives: None 0, an int itself, anything else 1."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    print(code, file=sys.stderr)
    return 1


def hydra_command(program: str, config_name: str) -> Callable[[Callable[[Any], Any]], Callable[..., int]]:
    """The one command-line style of ``python -m med3dvlm.<verb>``: Hydra overrides (``key=value``)
    on ``configs/<config_name>.yaml``, ``--help`` and ``--cfg job`` as Hydra gives them, a user's
    mistake as ``error: <one line>`` with status 2 (:func:`reports_mistakes`).

    Decorates the job ``job(cfg)`` and gives ``main(argv=None) -> exit status``: ``argv`` stands in
    for the command line (tests, scripts); a ``SystemExit`` of the job becomes the status; what the
    job returns goes to Hydra (a sweeper optimises it) and does not change the status."""
    import hydra

    def decorate(job: Callable[[Any], Any]) -> Callable[..., int]:
        @functools.wraps(job)
        def task(cfg: Any) -> Any:
            with reporting_mistakes():
                return job(cfg)

        hydra_task = hydra.main(version_base=HYDRA_VERSION_BASE, config_path=CONFIG_PATH, config_name=config_name)(task)
        reported = reports_mistakes(program)(lambda: hydra_task() and None)

        @functools.wraps(job)
        def main(argv: Sequence[str] | None = None) -> int:
            saved = sys.argv
            if argv is not None:
                sys.argv = [saved[0] if saved else program, *map(str, argv)]
            try:
                return exit_status(reported())
            except SystemExit as stop:
                return exit_status(stop.code)
            finally:
                sys.argv = saved

        main.job = job  # type: ignore[attr-defined]
        return main

    return decorate


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
    """Decorates a command's ``main`` (above ``@hydra.main``; :func:`hydra_command` does it): a user's mistake,
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
