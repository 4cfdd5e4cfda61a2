"""Build the Cython cores; the package metadata lives in pyproject.toml.

Every ``fastconv/kernels/_<name>.pyx`` becomes the extension ``fastconv.kernels._<name>``.
OpenMP is used where the compiler has it: ``FASTCONV_OPENMP=auto`` (default) probes for it,
``1`` forces it on, ``0`` builds serial kernels. The compiled modules are also copied into
the source tree (``FASTCONV_INPLACE=0`` skips that), so that a checkout imported as the package,
as ``python -m fastconv`` run there does, is the full package.
"""

import glob
import os
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError, LinkError

OMP_HEADER = "fastconv/kernels/_omp_compat.h"

OMP_PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) { printf("%d\n", omp_get_max_threads()); return 0; }
"""


class BuildExt(build_ext):
    """build_ext that adds optimization flags and OpenMP when the compiler supports it."""

    def build_extensions(self):
        mode = os.environ.get("FASTCONV_OPENMP", "auto").strip().lower() or "auto"
        if mode not in ("0", "1", "auto"):
            raise ValueError(f"FASTCONV_OPENMP={mode!r} is not one of ('0', '1', 'auto')")
        msvc = self.compiler.compiler_type == "msvc"
        compile_args = ["/O2"] if msvc else ["-O3"]
        omp_compile, omp_link = (["/openmp"], []) if msvc else (["-fopenmp"], ["-fopenmp"])
        use_omp = mode == "1" or (mode == "auto" and self._has_openmp(omp_compile, omp_link))
        link_args = []
        if use_omp:
            compile_args += omp_compile
            link_args += omp_link
            print(f"OpenMP enabled ({' '.join(omp_compile)})")
        else:
            print("OpenMP disabled (serial Cython kernels)")
        for ext in self.extensions:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + compile_args
            ext.extra_link_args = list(ext.extra_link_args or []) + link_args
        # setuptools skips extensions newer than their sources: rebuild when the flags change.
        stamp = os.path.join(self.build_temp, "fastconv-flags.txt")
        flags = " ".join(compile_args + ["|"] + link_args)
        try:
            with open(stamp) as f:
                self.force = self.force or f.read() != flags
        except OSError:
            self.force = True
        super().build_extensions()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(flags)

    def run(self):
        super().run()
        # `python -m fastconv ...` run in the checkout imports this source tree, not the
        # installed copy (the current directory comes first on sys.path): give the tree the
        # same compiled modules, as an in-place build would. FASTCONV_INPLACE=0 skips it.
        if self.inplace or os.environ.get("FASTCONV_INPLACE", "1").strip() == "0":
            return
        try:
            self.copy_extensions_to_source()
        except OSError as e:  # a read-only checkout: the installed copy still works
            print(f"fastconv: compiled modules not copied into the source tree ({e})")

    def _has_openmp(self, compile_args, link_args):
        """Compile and link a program calling omp_get_max_threads() with the flags."""
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "omp_probe.c")
            with open(src, "w") as f:
                f.write(OMP_PROBE)
            try:
                objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
                self.compiler.link_executable(
                    objects, "omp_probe", output_dir=tmp, extra_postargs=link_args)
            except (CompileError, LinkError, OSError):
                return False
        return True


extensions = [
    Extension(
        "fastconv.kernels." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[np.get_include(), os.path.dirname(OMP_HEADER)],
        depends=[OMP_HEADER],
    )
    for path in sorted(glob.glob("fastconv/kernels/_*.pyx"))
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3}),
    cmdclass={"build_ext": BuildExt},
)
