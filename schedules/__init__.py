"""Per-target schedules (AVX2, AVX-512, CUDA) for the operators of ``compiler/``: the *how* of each operator.

Schedules import TVM, :mod:`targets`, the weight layouts of :mod:`model.ternary` and each other; never ``compiler/``
or ``runtime/`` (the compiler hands a schedule its PrimFunc and knobs). Importing this package sizes TVM's thread pool
to every core (:func:`targets.ensure_tvm_threads`) before the pool starts.
"""

import targets

targets.ensure_tvm_threads()
