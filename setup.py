"""Builds the C++ scalar reference (pybind11). Everything else is declared in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "model.ternary._scalar_ref",
            ["model/ternary/_scalar_ref.cpp"],
            cxx_std=17,
            extra_compile_args=["-O2", "-fno-tree-vectorize"],  # the reference stays scalar on purpose
        )
    ],
    cmdclass={"build_ext": build_ext},
)
