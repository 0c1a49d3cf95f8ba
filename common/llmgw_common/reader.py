"""Reading one YAML mapping of the configuration: types checked, unknown keys refused, every error
prefixed with the dotted path of the key (``providers[0].openai.baseURL: required``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


class Reader:
    """Reads one YAML mapping, checking types and refusing unknown keys, with the key's path in errors."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'config'}: must be a mapping, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False
    ) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                raise ConfigError(f"{self.path(key)}: required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self.path(key)}: must be {_kind_name(kinds)}, got a boolean")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise ConfigError(f"{self.path(key)}: must be {_kind_name(kinds)}, got {type(value).__name__}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, exclusive: bool = True) -> float:
        value = self.get(key, float, default)
        if value < minimum or (exclusive and value == minimum):
            op = ">" if exclusive else ">="
            raise ConfigError(f"{self.path(key)}: must be {op} {minimum:g}, got {value:g}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
        value = self.get(key, int, default)
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" to {maximum}" if maximum is not None else " or more"
            raise ConfigError(f"{self.path(key)}: must be an integer from {minimum}{upper}, got {value}")
        return int(value)

    def section(self, key: str, build: Callable[[Reader], T], default: T) -> T:
        raw = self.get(key, dict)
        if raw is None:
            return default
        reader = Reader(raw, self.path(key))
        result = build(reader)
        reader.done()
        return result

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.path(unknown[0])}: unknown key (allowed: {', '.join(sorted(self.used))})"
            )


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def check_listen_address(value: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` split into its parts (brackets around an IPv6 host removed), or ConfigError."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT, got {value!r}")
    return host, int(port)
