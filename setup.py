"""Build the Cython cores; the package metadata lives in pyproject.toml.

Every ``fastconv/kernels/_<name>.pyx`` becomes the extension ``fastconv.kernels._<name>``. The
kernels need no OpenMP: fastconv's own thread pool runs them (see fastconv/_threads.py). Where
they cannot be compiled (no C compiler) the install still succeeds, with a warning, and the
reason is kept in the package for ``python -m fastconv info``. The
compiled modules are also copied into the source tree (``FASTCONV_INPLACE=0`` skips that), so
that a checkout imported as the package, as ``python -m fastconv`` run there does, is the full
package.
"""

import glob
import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "fastconv/kernels"
#: Written into the package when the core cannot be compiled: fastconv reads why from it.
BUILD_NOTE = "BUILD_FAILED.txt"


class BuildExt(build_ext):
    """build_ext with optimization flags and the in-place copy."""

    def build_extensions(self):
        flags = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3"]
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + flags
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as e:  # no C compiler, no Python headers: the Numba methods still work
            why = f"{type(e).__name__}: {e}".strip()
            print(f"WARNING: fastconv's compiled core could not be built ({why}); the naive and "
                  "direct methods work, im2col does not. Install a C compiler (and the Python "
                  "headers) and reinstall to build it.")
            for root in (self.build_lib, "." if not self.inplace else None):
                if root is not None and os.path.isdir(os.path.join(root, KERNELS)):
                    with open(os.path.join(root, KERNELS, BUILD_NOTE), "w") as f:
                        f.write(why + "\n")
            return
        for root in (self.build_lib, "."):  # a build that works clears an old note
            note = os.path.join(root, KERNELS, BUILD_NOTE)
            if os.path.exists(note):
                os.remove(note)
        # `python -m fastconv ...` run in the checkout imports this source tree, not the
        # installed copy (the current directory comes first on sys.path): give the tree the
        # same compiled modules, as an in-place build would.
        if self.inplace or os.environ.get("FASTCONV_INPLACE", "1").strip() == "0":
            return
        try:
            self.copy_extensions_to_source()
        except OSError as e:  # a read-only checkout: the installed copy still works
            print(f"fastconv: compiled modules not copied into the source tree ({e})")


extensions = [
    Extension(
        "fastconv.kernels." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[np.get_include(), KERNELS],
        depends=[f"{KERNELS}/_claim.h", f"{KERNELS}/_geom.pxd"],
    )
    for path in sorted(glob.glob(f"{KERNELS}/_*.pyx"))
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}),
    cmdclass={"build_ext": BuildExt},
)
