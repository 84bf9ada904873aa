"""Build the tuned AVX-512 kernels of the given op keys with the intrinsics now in ``schedules/intrin_x86.py`` and
export each to ``OUT/<key>.so`` (run once as committed and once with ``gfni_planes.diff`` applied).

    python docs/bench/gfni_planes/build.py OUT gemv_i8:M=13824:K=2560:tile=8 ...
"""

import os
import sys

from compiler import schedule
from compiler.tune import parse_shape


def file_name(key: str) -> str:
    return key.replace(":", "_").replace("=", "") + ".so"


if __name__ == "__main__":
    out, keys = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    for key in keys:
        ex = schedule.get_primfunc(parse_shape(key), "avx512", cores=2).build()
        ex.export_library(os.path.join(out, file_name(key)))
        print("built", key)
