"""``key=value`` command lines for the demo and the app, without Hydra.

The demo and the app take the same ``key=value`` syntax as the Hydra entry points
(``model_dir=... image=...``) but start in a second, since they compose no config. A mistake
(unknown key, missing value, bad number) is a :class:`UsageError`: the entry point prints it with
the usage and exits with status 2, never with a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
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
