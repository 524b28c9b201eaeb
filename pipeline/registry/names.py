"""Names in the registry (models, versions, aliases) and where they live; the registry's errors.

Every name becomes a path part, so a name that could leave the registry is refused here, once,
for the store, the aliases and the commands alike.
"""

from __future__ import annotations

from pipeline import artifacts

NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128"


class RegistryError(RuntimeError):
    pass


class VersionExists(RegistryError):
    """Another publisher committed this version with other content first."""


def check_name(kind: str, value: str) -> str:
    """Model, version and alias names become path parts: refuse anything that could leave the registry."""
    ok = 0 < len(value) <= 128 and value[0].isalnum() and all(c.isalnum() or c in "._-" for c in value) and value.isascii()
    if not ok:
        raise RegistryError(f"{kind} {value!r} is not a valid name: {NAME_RULE} characters")
    return value


def version_url(registry: str, model_name: str, version: str) -> str:
    return artifacts.join(registry, check_name("model name", model_name), check_name("version", version))
