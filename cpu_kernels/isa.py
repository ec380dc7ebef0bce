"""Which integer dot-product instructions the expert kernels (moe_int4.py) emit, chosen at run time.

    avx512vnni     vpdpbusd (u8 x s8 -> s32, 4 products per lane, one instruction) on 256-bit registers,
                   EVEX-encoded (AVX512_VNNI + AVX512VL: Ice Lake and later, Zen 4/5)
    avx512vnni512  the same instruction on 512-bit registers: two 8-row tiles per step (16 lanes = 16 rows).
                   Opt-in (HYBRID_CPU_ISA=avx512vnni512) until a Zen 4/5 run measures it against the
                   256-bit path; its 16-row logic is tested everywhere through generic512
    avxvnni        the 256-bit instruction VEX-encoded (AVX-VNNI: Alder Lake and later)
    avx2           vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd by ones (s16 pairs -> s32): the path every
                   x86-64-v3 CPU runs
    generic        plain LLVM vector operations (no x86 intrinsics), for CPUs without AVX2
    generic512     avx512vnni512's code with the dot product written as plain LLVM vector operations: runs
                   on any CPU, so the 16-row path is checked on machines without AVX-512 (opt-in, slow)

All compute the same exact integer group sums (|sum| fits int16 on the AVX2 path, see moe_int4.py), so
their outputs are bitwise equal. ISA is picked once at import: HYBRID_CPU_ISA=<name> forces one (an error
if this CPU cannot run it), "auto" (default) takes the first of AUTO the CPU reports. A forced ISA turns
off numba's on-disk cache for the kernels (the cache does not see environment variables; only auto-picked
code is ever cached, and numba keys its cache by CPU). CPU features are the host's, or NUMBA_CPU_FEATURES
when set (numba then compiles for that CPU; tests use it to compile, not run, AVX-512 code on any machine).
The tile layout (8 rows x 4 inputs per 32 bytes, layout.py) is the same for all.
Checked by tests/test_cpu_kernels.py (each variant this CPU can run, in a subprocess; the AVX-512 code's
instructions compiled for Zen 4). docs/cpu_isa.md: the variants, how to measure them, an AMX design.
"""
import os

import llvmlite.binding as llvm

ISAS = ("avx512vnni512", "avx512vnni", "avxvnni", "avx2", "generic", "generic512")
OPT_IN = ("avx512vnni512", "generic512")        # never picked by auto
AUTO = tuple(i for i in ISAS if i not in OPT_IN)
WIDE = ("avx512vnni512", "generic512")          # 16-row (two-tile) kernels
ENV = "HYBRID_CPU_ISA"
REQUIRES = {"avx512vnni512": ("avx512vnni", "avx512f", "avx512bw", "avx2"),
            "avx512vnni": ("avx512vnni", "avx512vl", "avx2"), "avxvnni": ("avxvnni", "avx2"),
            "avx2": ("avx2",), "generic": (), "generic512": ()}


def _features() -> dict:
    spec = os.environ.get("NUMBA_CPU_FEATURES", "").strip()
    if spec:                       # "+avx2,+fma,-avx512f,..." (what numba compiles for)
        return {f[1:]: f[0] == "+" for f in spec.split(",") if f[:1] in "+-" and len(f) > 1}
    return {k: bool(v) for k, v in llvm.get_host_cpu_features().items()}


FEATURES = _features()


def missing(isa: str, features: dict | None = None) -> list[str]:
    """CPU features `isa` needs that this CPU (or `features`) does not report."""
    if isa not in REQUIRES:
        raise ValueError(f"{ENV}={isa!r} unknown; choose auto or one of {', '.join(ISAS)}")
    f = FEATURES if features is None else features
    return [r for r in REQUIRES[isa] if not f.get(r, False)]


def runnable(features: dict | None = None) -> list[str]:
    """Every ISA this CPU (or `features`) can run, opt-in ones included: what HYBRID_CPU_ISA may force."""
    return [i for i in ISAS if not missing(i, features)]


def supported(features: dict | None = None) -> list[str]:
    """The ISAs auto can pick on this CPU (or `features`), best first."""
    return [i for i in AUTO if not missing(i, features)]


def pick(requested: str | None = None, features: dict | None = None) -> tuple[str, bool]:
    """(isa, forced): `requested` (default: $HYBRID_CPU_ISA or auto) checked against the CPU."""
    req = (requested if requested is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if req == "auto":
        return supported(features)[0], False
    lack = missing(req, features)
    if lack:
        raise RuntimeError(f"{ENV}={req}: this CPU lacks {', '.join(lack)}; it can run {', '.join(runnable(features))}")
    return req, True


ISA, FORCED = pick()
