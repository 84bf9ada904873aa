"""TVM operators (tensor expressions), whole-model lowering, tuning and kernel benchmarks.

Kernel benchmark: ``python -m bench.kernels --help``.
"""
