"""Where a CUDA step's time goes: a ``torch.profiler`` (CUPTI) trace of repeated calls, counted per call.

    from bench.cuda_trace import trace
    t = trace(lambda: eng.decode(tok), calls=50)     # on a GPU host with torch; see bench.runtime --target cuda

Per call: the device kernels that ran and their summed time (``busy_us``; the kernels of one step run one after
another on one stream, so the sum is the time the GPU was busy), the host's launches by API (``cudaGraphLaunch``;
``cuLaunchKernel`` / ``cudaLaunchKernel``: kernels launched one by one), device allocations (``cudaMalloc`` /
``cudaFree``, ``cuMemAlloc`` / ``cuMemFree``), copies, and synchronising calls; ``busy_fraction`` is ``busy_us``
over the wall time of the traced calls. ``top`` lists the kernels by total time. Used by ``bench.runtime`` for the
CUDA rows and by ``scripts/gpu_model.sh`` (the trace behind ``docs/bench/cuda``).
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict

GRAPH = ("cudaGraphLaunch",)
LAUNCH = ("cuLaunchKernel", "cudaLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
ALLOC = ("cudaMalloc", "cudaFree", "cuMemAlloc", "cuMemFree", "cudaMallocAsync", "cudaFreeAsync")
SYNC = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cuCtxSynchronize",
        "cuStreamSynchronize")  # fmt: skip


def _api(name: str, names: tuple[str, ...]) -> bool:
    return any(name == n or name.startswith(n + "_v") for n in names)


def trace(call, calls: int = 50, warmup: int = 5, top: int = 12) -> dict:
    """Profile ``calls`` calls of ``call()`` (after ``warmup`` untraced ones) and count per call (see the module
    docstring)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    host, kernels, copies = Counter(), Counter(), 0
    busy, per_kernel = 0.0, defaultdict(float)
    for e in prof.events():
        dur = e.time_range.elapsed_us()
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(("Memcpy", "Memset")):
                copies += 1
                continue
            kernels[e.name] += 1
            per_kernel[e.name] += dur
            busy += dur
        else:
            host[e.name] += 1

    def count(names):
        return sum(v for k, v in host.items() if _api(k, names)) / calls

    return {
        "calls": calls,
        "wall_us": wall / calls * 1e6,
        "busy_us": busy / calls,
        "busy_fraction": busy / (wall * 1e6),
        "kernels": sum(kernels.values()) / calls,
        "graph_launches": count(GRAPH),
        "host_launches": count(LAUNCH),
        "allocations": count(ALLOC),
        "syncs": count(SYNC),
        "copies": copies / calls,
        "top": [
            {"kernel": k, "us_per_call": per_kernel[k] / calls, "launches_per_call": kernels[k] / calls}
            for k in sorted(per_kernel, key=per_kernel.get, reverse=True)[:top]
        ],
    }


def copy_gbs(nbytes: int = 2 << 30, reps: int = 9) -> float:
    """Device-to-device copy rate (GB/s, bytes read + written) of an ``nbytes`` buffer: the median of ``reps``
    CUDA-event timings (the HBM roof the CUDA rows of ``bench.runtime`` are measured against)."""
    import torch

    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2] / 1e9
