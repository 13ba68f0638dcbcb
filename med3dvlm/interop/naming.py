"""Renaming parameters between the released Med3DVLM code and med3dvlm, and strict loading.

A :class:`NameRule` pairs a released name template with a med3dvlm one, e.g.
``"encoder.s{stage}.{block}.scale"`` <-> ``"stages.{stage}.{block}.layer_scale"``. The same rule
table converts in both directions, so the two converters cannot drift apart, and a name that no
rule explains is an error instead of a silently dropped tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

# What a template field may match: block, layer and branch indices are numbers; `param` is the
# tensor's own name (weight, bias, running_mean, ...).
FIELD_PATTERNS = {"param": r"[A-Za-z_]\w*"}
DEFAULT_FIELD_PATTERN = r"\d+"
_FIELD = re.compile(r"\{(\w+)\}")
# Lists in error messages stop after this many names.
MAX_NAMES_SHOWN = 8


class ReleasedCheckpointError(ValueError):
    """A released checkpoint does not fit the med3dvlm module it is loaded into."""


def _template_regex(template: str) -> re.Pattern[str]:
    parts, position = [], 0
    for match in _FIELD.finditer(template):
        parts.append(re.escape(template[position : match.start()]))
        name = match.group(1)
        parts.append(f"(?P<{name}>{FIELD_PATTERNS.get(name, DEFAULT_FIELD_PATTERN)})")
        position = match.end()
    parts.append(re.escape(template[position:]))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class NameRule:
    """One released name template and its med3dvlm counterpart, with the same ``{fields}``."""

    released: str
    ours: str
    _patterns: tuple[re.Pattern[str], re.Pattern[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if set(_FIELD.findall(self.released)) != set(_FIELD.findall(self.ours)):
            raise ValueError(f"rule {self.released!r} <-> {self.ours!r} must use the same fields on both sides")
        object.__setattr__(self, "_patterns", (_template_regex(self.released), _template_regex(self.ours)))

    def convert(self, name: str, to_ours: bool) -> str | None:
        source, target = (self._patterns[0], self.ours) if to_ours else (self._patterns[1], self.released)
        match = source.fullmatch(name)
        return None if match is None else target.format(**match.groupdict())


class NameMapping:
    """A rule table that renames whole state dicts in either direction (``what`` names it in errors)."""

    def __init__(self, rules: Iterable[NameRule], what: str) -> None:
        self.rules = tuple(rules)
        self.what = what

    def rename(self, name: str, to_ours: bool) -> str | None:
        """The other side's name of ``name``, or None when no rule explains it."""
        results = {r for rule in self.rules if (r := rule.convert(name, to_ours)) is not None}
        if len(results) > 1:  # a defect of the rule table, not of the checkpoint
            raise RuntimeError(f"{self.what}: name {name!r} matches several rules: {sorted(results)}")
        return results.pop() if results else None

    def to_ours(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._convert(state_dict, to_ours=True)

    def to_released(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._convert(state_dict, to_ours=False)

    def _convert(self, state_dict: Mapping[str, torch.Tensor], to_ours: bool) -> dict[str, torch.Tensor]:
        converted: dict[str, torch.Tensor] = {}
        unknown = []
        for name, tensor in state_dict.items():
            new_name = self.rename(name, to_ours)
            if new_name is None:
                unknown.append(name)
            else:
                converted[new_name] = tensor
        if unknown:
            side = "released" if to_ours else "med3dvlm"
            raise ReleasedCheckpointError(
                f"{self.what}: {len(unknown)} {side} parameter name(s) that no {self.what} parameter has: "
                f"{format_names(unknown)}. Is this the right checkpoint, with its prefix removed?"
            )
        return converted


def format_names(names: Iterable[str], describe: Callable[[str], str] = repr) -> str:
    names = list(names)
    shown = ", ".join(describe(name) for name in names[:MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names) - MAX_NAMES_SHOWN} more)" if len(names) > MAX_NAMES_SHOWN else "")


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    released_name: Callable[[str], str | None] | None = None,
) -> nn.Module:
    """Load ``state_dict`` (med3dvlm names) into ``module``: every tensor used, every shape equal.

    On any mismatch one error lists the missing, unexpected and wrongly shaped parameters, each by
    its released name (``released_name`` translates) and its med3dvlm name.
    """

    def describe(name: str) -> str:
        released = released_name(name) if released_name is not None else None
        return repr(name) if released in (None, name) else f"{released!r} (med3dvlm {name!r})"

    expected = module.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    wrong_shape = [
        name for name in expected if name in state_dict and tuple(state_dict[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {format_names(missing, describe)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {format_names(unexpected, describe)}")
    if wrong_shape:
        shapes = [
            f"{describe(name)} is {list(state_dict[name].shape)}, expected {list(expected[name].shape)}"
            for name in wrong_shape[:MAX_NAMES_SHOWN]
        ]
        more = f"; ... ({len(wrong_shape) - MAX_NAMES_SHOWN} more)" if len(wrong_shape) > MAX_NAMES_SHOWN else ""
        problems.append(f"wrong shape {len(wrong_shape)}: " + "; ".join(shapes) + more)
    if problems:
        raise ReleasedCheckpointError(f"{what} does not fit the checkpoint: " + " | ".join(problems))
    module.load_state_dict(dict(state_dict), strict=True)
    return module


def build_uninitialised(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device, then uninitialised CPU storage.

    For modules that :func:`load_strict` fills completely right after: random initialisation would
    be thrown away (seconds for the larger encoders, minutes for an LLM). Refused for modules with
    non-persistent buffers, which no state dict would fill.
    """
    with torch.device("meta"):
        module = build()
    unfilled = set(dict(module.named_buffers())) - set(module.state_dict())
    if unfilled:
        raise RuntimeError(f"{type(module).__name__} has buffers no state dict fills: {sorted(unfilled)}")
    return module.to_empty(device="cpu")


def split_prefixes(
    state_dict: Mapping[str, torch.Tensor], prefixes: Iterable[str], what: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Group a checkpoint by name prefix (``"vision_encoder."`` -> its sub-dict with the prefix cut).

    A prefix without ``.`` at its end names a single tensor (``"t_prime"``), grouped under ``""``.
    Names under no prefix are an error naming them.
    """
    prefixes = list(prefixes)
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    unknown = []
    for name, tensor in state_dict.items():
        for prefix in prefixes:
            if prefix.endswith(".") and name.startswith(prefix):
                groups[prefix][name[len(prefix) :]] = tensor
                break
            if name == prefix:
                groups[prefix][""] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise ReleasedCheckpointError(
            f"{what}: unexpected parameter(s) {format_names(unknown)}; "
            f"expected only names under {', '.join(repr(p) for p in prefixes)}"
        )
    return groups


def add_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in state_dict.items()}


def as_scalar(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A one-element tensor as 0-d (released scalars are saved as shape [] or [1])."""
    if tensor.numel() != 1:
        raise ReleasedCheckpointError(
            f"{name!r} must hold one number (shape [] or [1]), got shape {list(tensor.shape)}"
        )
    return tensor.reshape(())
