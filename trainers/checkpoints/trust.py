"""Which Python names a stored config may make kiln import.

A checkpoint's config is data written by whoever wrote the checkpoint. jsonargparse imports
what a config names -- a `class_path` at any depth, and a plain dotted string wherever the type
is a class or a `Callable` (a data mapper, a callback, a logger) -- and importing a module runs
its top-level code. So the whole config is checked before any of it is parsed: every
`class_path`, and every dotted string whose first part is an importable module, must belong to
kiln or to a package named in `KILN_TRUSTED_PACKAGES` (comma-separated, e.g. `mypkg,otherpkg`).

Finding a top-level module (`importlib.util.find_spec` on one name) searches the path without
executing anything; strings that name no importable module ("last.ckpt", "flag: Japan") could
not be imported by anyone and are left alone.
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Iterator

DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


class UntrustedConfig(ValueError):
    """A config that names code outside kiln and the trusted packages."""


def trusted_packages() -> list[str]:
    return ["kiln", *(p.strip() for p in os.environ.get("KILN_TRUSTED_PACKAGES", "").split(",") if p.strip())]


def is_trusted(name: str, trusted: list[str] | None = None) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in (trusted or trusted_packages()))


def _names(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """(key path, string) for every class_path and every dotted string in a config."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _names(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _names(item, f"{where}[{i}]")
    elif isinstance(value, str):
        yield where, value


def _importable(name: str) -> bool:
    top = name.split(".", 1)[0]
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def check_config(config: Any, source: str = "checkpoint config") -> None:
    """Raise `UntrustedConfig` naming the first class or callable outside the trusted packages."""
    trusted = trusted_packages()
    for where, value in _names(config, ""):
        value = value.strip()
        is_class_path = where == "class_path" or where.endswith(".class_path")
        if not is_class_path and not (DOTTED.fullmatch(value) and _importable(value)):
            continue
        if not is_trusted(value, trusted):
            raise UntrustedConfig(f"{source} names code outside kiln at {where}: {value!r} "
                                  "(trust its package with KILN_TRUSTED_PACKAGES)")
