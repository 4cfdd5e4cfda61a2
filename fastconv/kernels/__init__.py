"""The compute kernels. Importing this package first settles where Numba caches them.

Numba caches a compiled function next to its source file, or else in the user's cache
directory. In a read-only install with no writable home neither works, and Numba refuses to
even define a ``cache=True`` function. Then the kernels cache in a private directory under the
system's temporary directory, and where that is not writable either, they compile in every
process without an on-disk cache (`NUMBA_CACHE`). A ``NUMBA_CACHE_DIR`` set by the user is
always left as it is.
"""

from __future__ import annotations

import os
import tempfile

import numba

__all__ = ["NUMBA_CACHE", "IndicesOutsidePlane", "numba_cache_location"]


class IndicesOutsidePlane(ValueError):
    """Raised by a max_pool2d_backward kernel registered with ``checks_indices`` that met an
    index outside the plane (it skipped it); fastconv.functional turns it into the validator's
    message."""


def _probe():  # pragma: no cover - never called: its cache locator is what matters
    return 0


def _cache_dir_of(dispatcher) -> str | None:
    cache = getattr(dispatcher, "_cache", None)
    return getattr(cache, "_cache_path", None)


def _writable_dir(path: str) -> bool:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def _settle_cache() -> tuple[bool, str]:
    """(whether kernels use ``cache=True``, where the cache is, in words)."""
    if numba.config.CACHE_DIR:
        return True, f"{numba.config.CACHE_DIR} (NUMBA_CACHE_DIR)"
    try:  # a function in this directory finds the locator the kernels will find
        return True, _cache_dir_of(numba.njit(cache=True)(_probe)) or "Numba's default"
    except RuntimeError:  # "cannot cache function ...: no locator available"
        pass
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    private = os.path.join(tempfile.gettempdir(), f"fastconv-numba-cache-{uid}")
    if _writable_dir(private):
        # the environment too: Numba re-reads it when a NUMBA_* variable changes
        os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = private
        return True, f"{private} (the package and the user's cache dir are read-only)"
    return False, "none: no writable location, kernels compile in every process"


NUMBA_CACHE, _LOCATION = _settle_cache()

_BUILD_NOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "BUILD_FAILED.txt")
if os.path.exists(_BUILD_NOTE):  # written by setup.py when there was no C compiler
    import warnings

    warnings.warn("fastconv's compiled core was not built when it was installed, so "
                  "method='im2col' is unavailable (naive and direct work); see `python -m "
                  "fastconv info`, and reinstall with a C compiler to build it", RuntimeWarning,
                  stacklevel=2)


def numba_cache_location() -> str:
    """Where the Numba kernels' compiled code is cached, in words (for ``info``)."""
    return _LOCATION
