"""Task engines. Importing this package registers the built-in engines."""

from bitserve.frontend import classify, translate  # noqa: F401  (registration side effects)
from bitserve.frontend.base import engine_class, register, registered  # noqa: F401

# Optional engines register themselves when their module imports cleanly.
for _mod in ("generate", "instruct"):
    try:
        __import__(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # not written yet / optional
        if _e.name != f"{__name__}.{_mod}":
            raise
