"""Library versions recorded in manifests and reports (results depend on them)."""

from __future__ import annotations

from importlib import metadata

_PACKAGES = ("bitserve", "torch", "transformers", "bitsandbytes", "peft", "accelerate")


def versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
