"""Builds the C++ scalar reference (pybind11) and ships the data a checkout keeps outside the packages. Everything else
is declared in pyproject.toml.

An installed (non-editable) package carries ``tuning_logs/`` as ``compiler/tuning_logs/`` (found by
``compiler.cache.logs_root``) and ``models/small.gguf`` as ``runtime/models/small.gguf`` (``runtime.chat
.default_model``), so ``python -m runtime.chat`` compiles and runs the shipped model without a checkout. An editable
install reads them from the checkout instead.
"""

import shutil
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = {  # checkout path -> path inside the built packages
    "tuning_logs": "compiler/tuning_logs",
    "models/small.gguf": "runtime/models/small.gguf",
}


class build_py_with_data(build_py):
    """``build_py`` plus :data:`DATA` copied into the build tree (skipped for editable installs)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for src, dst in DATA.items():
            src, dst = ROOT / src, Path(self.build_lib) / dst
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.tmp", ".*"))
            elif src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(
    ext_modules=[
        Pybind11Extension(
            "model.ternary._scalar_ref",
            ["model/ternary/_scalar_ref.cpp"],
            cxx_std=17,
            extra_compile_args=["-O2", "-fno-tree-vectorize"],  # the reference stays scalar on purpose
        )
    ],
    cmdclass={"build_ext": build_ext, "build_py": build_py_with_data},
)
