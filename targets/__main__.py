"""``python -m targets``: this CPU's flags, the targets it supports and the one ``auto`` picks."""

from targets import cpu, detect, missing_flags, supported, target_dict

masked = f"  (hidden by {cpu.MASK_ENV}: {sorted(cpu._proc_flags() - cpu.cpu_flags())})" if cpu.mask_patterns() else ""
print("flags:", " ".join(sorted(cpu.cpu_flags())) + masked)
for t in ("avx512", "avx2"):
    print(f"{t:7s} supported={supported(t)} missing={missing_flags(t)} target={target_dict(t)}")
print("auto ->", detect())
