"""Build script. Metadata lives in pyproject.toml; this builds the C kernels (cext/).

The extension is optional: without a C compiler (or OpenMP) offload installs anyway and
runs its Numba kernels, saying so once at the first matmul.
"""

import glob
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler failure means "no C kernels"
            print(f"offload: C kernels not built ({e}); the Numba kernels will be used", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"offload: C kernels not built ({e}); the Numba kernels will be used", file=sys.stderr)


cext = Extension(
    "offload._cext",
    sources=sorted(glob.glob("cext/*.c")),
    depends=glob.glob("cext/*.h"),
    # -ffp-contract=off: only the explicit fmaf/_mm256_fmadd_ps fuse, as in ggml's build
    extra_compile_args=["-O3", "-std=c11", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[cext], cmdclass={"build_ext": OptionalBuildExt})
