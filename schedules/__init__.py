"""Per-target schedules (AVX2, AVX-512, CUDA) for the operators of ``compiler/``: the *how* of each operator."""
