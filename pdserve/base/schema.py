"""Frozen dataclasses from plain mappings (parsed YAML, CLI overrides), with unknown keys rejected
by their path: the mechanism behind pdserve's config (``config.load``) and the simulator's named
setups (``sim.setup``). Imports nothing of pdserve's."""
from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


def require(ok: bool, message: str) -> None:
    """Raise ``ConfigError(message)`` unless ``ok`` (the dataclasses' ``__post_init__`` checks)."""
    if not ok:
        raise ConfigError(message)


def _require_mapping(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses.

    Raises ConfigError for an unknown key or a value of the wrong shape.
    """
    _require_mapping(data, path.rstrip(".") or "config")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    require(not unknown, f"unknown config key(s) {', '.join(path + k for k in unknown)}")
    values = {}
    for name, value in data.items():
        factory = fields[name].default_factory
        default = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):  # a section overrides its field's own default
            _require_mapping(value, f"{path}{name}")
            base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)}
            value = from_dict(type(default), {**base, **value}, f"{path}{name}.")
        values[name] = value
    return cls(**values)
