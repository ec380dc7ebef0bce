"""Which integer dot-product instructions the expert kernels (moe_int4.py) emit, chosen at run time.

    avx512vnni  vpdpbusd (u8 x s8 -> s32, 4 products per lane, one instruction) on 256-bit registers,
                EVEX-encoded (AVX512_VNNI + AVX512VL: Ice Lake and later, Zen 4/5)
    avxvnni     the same instruction VEX-encoded (AVX-VNNI: Alder Lake and later)
    avx2        vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd by ones (s16 pairs -> s32): the path every
                x86-64-v3 CPU runs
    generic     plain LLVM vector operations (no x86 intrinsics), for CPUs without AVX2

All four compute the same exact integer group sums (|sum| fits int16 on the AVX2 path, see moe_int4.py),
so their outputs are bitwise equal. ISA is picked once at import: HYBRID_CPU_ISA=<name> forces one (an
error if this CPU cannot run it), "auto" (default) takes the first of ISAS the CPU reports. A forced ISA
turns off numba's on-disk cache for the kernels (the cache does not see environment variables; only
auto-picked code is ever cached, and numba keys its cache by CPU). The tile layout (8 rows x 4 inputs
per 32 bytes, layout.py) is shared: a 512-bit variant needs 16-row tiles and is not built yet.
Checked by tests/test_cpu_kernels.py (each variant this CPU can run, in a subprocess).
"""
import os

import llvmlite.binding as llvm

ISAS = ("avx512vnni", "avxvnni", "avx2", "generic")
ENV = "HYBRID_CPU_ISA"
FEATURES = {k: bool(v) for k, v in llvm.get_host_cpu_features().items()}
REQUIRES = {"avx512vnni": ("avx512vnni", "avx512vl", "avx2"), "avxvnni": ("avxvnni", "avx2"),
            "avx2": ("avx2",), "generic": ()}


def missing(isa: str, features: dict | None = None) -> list[str]:
    """CPU features `isa` needs that this CPU (or `features`) does not report."""
    if isa not in REQUIRES:
        raise ValueError(f"{ENV}={isa!r} unknown; choose auto or one of {', '.join(ISAS)}")
    f = FEATURES if features is None else features
    return [r for r in REQUIRES[isa] if not f.get(r, False)]


def supported(features: dict | None = None) -> list[str]:
    """The ISAs this CPU can run, best first."""
    return [i for i in ISAS if not missing(i, features)]


def pick(requested: str | None = None, features: dict | None = None) -> tuple[str, bool]:
    """(isa, forced): `requested` (default: $HYBRID_CPU_ISA or auto) checked against the CPU."""
    req = (requested if requested is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if req == "auto":
        return supported(features)[0], False
    lack = missing(req, features)
    if lack:
        raise RuntimeError(f"{ENV}={req}: this CPU lacks {', '.join(lack)}; it can run {', '.join(supported(features))}")
    return req, True


ISA, FORCED = pick()
