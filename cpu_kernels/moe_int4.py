"""Numba INT4 x INT8 routed-expert kernels (AVX2 integer dot products emitted as LLVM IR).

Math per token t and chosen expert e (weights in the tiled layout of ``layout.py``):
    y[t] += w[t,k] * down_e( silu(gate_e x_t) * up_e x_t )
Activations (x, and the intermediate h) are quantized per group of 32 to int8 with one fp32
scale sx (absmax / 127, round to nearest). For a group, with stored nibbles u = q_w + 8:
    sum_c q_w[c] x[c] = sw * (sx * sum_c u[c] xq[c]  +  c_g),   c_g = -8 sx sum_c xq[c]
Inner loop (``_make_dot_tile``), per tile of 8 rows and group: 4 loads of 32 weight bytes give
8 (rows) x 4 (inputs) unsigned nibbles per register (mask / shift); each is multiplied by the
matching 4 int8 activations broadcast to all rows with ``vpmaddubsw`` (u8 x s8 -> s16 pairs) and
the 8 products are summed in int16 (|sum| <= 16*15*127 = 30480 < 2^15, no saturation), then one
``vpmaddwd`` by ones gives the 8 rows' int32 group sums, converted to fp32 and scaled by two FMAs
(sx, c_g broadcast; sw = the 8 rows' scales). No horizontal sums anywhere: lane r is row r.
A token tile of 1, 2 or 4 tokens shares each weight load (prefill: the weights are read once
per expert for all of its tokens).

Work split (all cores, ``prange``, GIL released):
  1. ``quantize_rows``: x -> int8 + per-group (sx, c), one row per token.
  2. ``gate_up``: items = (expert, 32 intermediate rows); h = silu(gate x) * up x for all the
     expert's tokens, quantized per group of 32 rows straight into (hq, hasc).
  3. ``down`` (many slots): items = 32 output rows; each loops over the active experts and
     adds w[t,k] * dot into y[t, rows] it owns (no races, fixed order: deterministic);
     ``down_slots`` + ``combine_slots`` (few slots, decode): items = (expert, 256 rows), one
     long contiguous run each, per-slot outputs summed afterwards.
Decode (T=1) and prefill share these kernels; the caller (``experts.py``) sorts the (token, k)
slots by expert and orders the items. The IR loop prefetches PREFETCH bytes ahead in the weight
stream (the hardware prefetchers alone leave ~15% of the bandwidth unused on one thread).
Instruction set (isa.py, picked at import, HYBRID_CPU_ISA forces one): with AVX512-VNNI or AVX-VNNI
the maddubs/add/pmaddwd chain of a group is one ``vpdpbusd`` per product (u8 x s8 summed in 4s into
the s32 lane of each row, exactly the same sums); on CPUs without AVX2 the IR uses generic vector
operations instead. With avx512vnni512 (and its portable twin generic512) each call covers TPC = 2
adjacent tiles: the same 32-byte vectors of both tiles are joined into one 512-bit register (16 lanes =
16 rows, W = 16), so the layout is unchanged and every caller steps over tiles in pairs (all item sizes
are multiples of 32 rows).
Checked by tests/test_cpu_kernels.py; speed by tools/bench_experts.py.
"""
import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir

from .isa import FORCED, ISA, WIDE as WIDE_ISAS

GROUP = 32
TILE = 8              # rows per tile = fp32 lanes of one AVX2 register (layout.py)
BLOCK = 144           # bytes per (tile, group): 128 nibble bytes + 8 bf16 scales
ROWS_PER_ITEM = 32    # output rows per `down` work item (prefill)
# Software prefetch distance in the weight stream (bytes; 0 = off). Measured on the 2-core EPYC,
# one thread streaming 400 MB: 0 -> 0.83, 4096 -> 0.92, 8192 -> 0.97 of the read bandwidth.
# A constant on purpose: numba's cache does not see environment variables.
PREFETCH = 8192
HAS_AVX2 = ISA not in ("generic", "generic512")
VNNI = ISA in ("avx512vnni", "avxvnni") + WIDE_ISAS
TPC = 2 if ISA in WIDE_ISAS else 1   # tiles per kernel call: 512-bit registers hold two tiles' 8 rows
W = TILE * TPC                       # rows (fp32 lanes) per kernel call
_CACHE = not FORCED       # a forced ISA is compiled fresh: numba's cache does not see HYBRID_CPU_ISA

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_v32i8 = ir.VectorType(_i8, 32)
_v16i16, _v8i16, _v32i16 = ir.VectorType(_i16, 16), ir.VectorType(_i16, 8), ir.VectorType(_i16, 32)
_v8i32, _v16i32 = ir.VectorType(_i32, 8), ir.VectorType(_i32, 16)


def _splat(ty, value):
    return ir.Constant(ty, [value] * ty.count)


def _gep_load(builder, base, offset, ty):
    """Unaligned load of ``ty`` at i8* base + offset (i64 value or python int)."""
    if isinstance(offset, int):
        offset = ir.Constant(_i64, offset)
    p = builder.bitcast(builder.gep(base, [offset]), ty.as_pointer())
    return builder.load(p, align=1)


def _bcast(builder, scalar, vty):
    v = builder.insert_element(ir.Constant(vty, None), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, vty.count), [0] * vty.count))


def _even_odd_add(builder, v, half_ty):
    n = half_ty.count
    ev = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(0, 2 * n, 2))))
    od = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(1, 2 * n, 2))))
    return builder.add(ev, od)


def _maddubs(builder, u, x):
    """u8 x s8 -> s16 sums of adjacent pairs (vpmaddubsw; never saturates with u <= 15)."""
    if HAS_AVX2:
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v16i16, [_v32i8, _v32i8]),
                                           "llvm.x86.avx2.pmadd.ub.sw")
        return builder.call(f, [u, x])
    prod = builder.mul(builder.zext(u, _v32i16), builder.sext(x, _v32i16))
    return _even_odd_add(builder, prod, _v16i16)


def _pairsum_i32(builder, a):
    """s16 [16] -> s32 [8] sums of adjacent pairs (vpmaddwd by ones)."""
    if HAS_AVX2:
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_v8i32, [_v16i16, _v16i16]),
                                           "llvm.x86.avx2.pmadd.wd")
        return builder.call(f, [a, _splat(_v16i16, 1)])
    return _even_odd_add(builder, builder.sext(a, _v16i32), _v8i32)


def _dpbusd(builder, acc, u, x):
    """acc s32 [L] + sums of 4 adjacent u8 x s8 products: vpdpbusd (256-bit, VEX with AVX-VNNI; 512-bit
    with avx512vnni512), or the same sums in plain vector operations (generic512)."""
    L = acc.type.count
    if ISA == "generic512":
        prod = builder.mul(builder.zext(u, ir.VectorType(_i32, 4 * L)), builder.sext(x, ir.VectorType(_i32, 4 * L)))
        pairs = _even_odd_add(builder, prod, ir.VectorType(_i32, 2 * L))
        return builder.add(acc, _even_odd_add(builder, pairs, acc.type))
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(acc.type, [acc.type] * 3),
                                       f"llvm.x86.avx512.vpdpbusd.{32 * L}")
    return builder.call(f, [acc, builder.bitcast(u, acc.type), builder.bitcast(x, acc.type)])


def _concat(builder, parts):
    """Two vectors of one type -> one of twice the lanes (a 512-bit value from two 256-bit tiles)."""
    if len(parts) == 1:
        return parts[0]
    n = parts[0].type.count
    return builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(_i32, 2 * n), list(range(2 * n))))


def _make_dot_tile(nt):
    """IR: TPC tiles of 8 weight rows (TPC * 8 = W lanes) . nt tokens, over all G groups.

    Arguments (integers; pointers as addresses): w (the first tile's G blocks of 144 bytes), ts (bytes
    from one tile to the next), G, x_0..x_3 (tokens' int8 rows, 32G bytes), a_0..a_3 (tokens' fp32
    [sx[G], c[G]]), out (fp32 [nt, W]: out[W t + 8 k + r] = row r of tile k . token t). Token slots
    j >= nt are ignored. With TPC = 2 each register holds the same 4 inputs of both tiles' 8 rows."""
    L = W
    vb, vi32, vf = ir.VectorType(_i8, 4 * L), ir.VectorType(_i32, L), ir.VectorType(_f32, L)

    @intrinsic
    def dot_tile(typingctx, w, ts, G, x0, x1, x2, x3, a0, a1, a2, a3, out):
        sig = types.void(w, ts, G, x0, x1, x2, x3, a0, a1, a2, a3, out)

        def codegen(context, builder, signature, args):
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf] * 3), f"llvm.fma.v{L}f32")
            i8p = _i8.as_pointer()
            args = [builder.sext(a, _i64) if a.type.width < 64 else a for a in args]
            wps = [builder.inttoptr(builder.add(args[0], builder.mul(args[1], ir.Constant(_i64, k))), i8p)
                   for k in range(TPC)]
            ng = args[2]
            xps = [builder.inttoptr(a, i8p) for a in args[3:3 + nt]]
            aps = [builder.inttoptr(a, i8p) for a in args[7:7 + nt]]
            outp = builder.inttoptr(args[11], _f32.as_pointer())
            cofs = builder.mul(ng, ir.Constant(_i64, 4))  # c[] follows sx[]
            entry = builder.block
            header = builder.append_basic_block("dt.header")
            body = builder.append_basic_block("dt.body")
            done = builder.append_basic_block("dt.done")
            builder.branch(header)

            builder.position_at_end(header)
            g = builder.phi(_i64)
            g.add_incoming(ir.Constant(_i64, 0), entry)
            accs = [builder.phi(vf) for _ in range(nt)]
            for a in accs:
                a.add_incoming(_splat(vf, 0.0), entry)
            builder.cbranch(builder.icmp_signed("<", g, ng), body, done)

            builder.position_at_end(body)
            bofs = builder.mul(g, ir.Constant(_i64, BLOCK))
            if PREFETCH:  # software prefetch PREFETCH bytes ahead: 3 lines cover one 144-byte step
                pf = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                    ir.VoidType(), [i8p, _i32, _i32, _i32]), "llvm.prefetch.p0i8")
                for wp in wps:
                    for d in (0, 64, 128):
                        addr = builder.gep(wp, [builder.add(bofs, ir.Constant(_i64, PREFETCH + d))])
                        builder.call(pf, [addr, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
            lo, hi = [], []
            for j in range(4):
                v = _concat(builder, [_gep_load(builder, wp, builder.add(bofs, ir.Constant(_i64, 32 * j)), _v32i8)
                                      for wp in wps])
                lo.append(builder.and_(v, _splat(vb, 15)))
                hi.append(builder.and_(builder.lshr(v, _splat(vb, 4)), _splat(vb, 15)))
            s8 = _concat(builder, [_gep_load(builder, wp, builder.add(bofs, ir.Constant(_i64, 128)), _v8i16)
                                   for wp in wps])
            sw = builder.bitcast(builder.shl(builder.zext(s8, vi32), _splat(vi32, 16)), vf)
            xofs = builder.mul(g, ir.Constant(_i64, 32))
            aofs = builder.mul(g, ir.Constant(_i64, 4))
            new = []
            for t in range(nt):
                acc16 = None
                acc32 = _splat(vi32, 0)
                for j in range(4):
                    for half, u in ((0, lo[j]), (1, hi[j])):
                        xi = _gep_load(builder, xps[t], builder.add(xofs, ir.Constant(_i64, 16 * half + 4 * j)), _i32)
                        xv = builder.bitcast(_bcast(builder, xi, vi32), vb)
                        if VNNI:
                            acc32 = _dpbusd(builder, acc32, u, xv)
                            continue
                        p = _maddubs(builder, u, xv)
                        acc16 = p if acc16 is None else builder.add(acc16, p)
                f = builder.sitofp(acc32 if VNNI else _pairsum_i32(builder, acc16), vf)
                sx = _bcast(builder, _gep_load(builder, aps[t], aofs, _f32), vf)
                cg = _bcast(builder, _gep_load(builder, aps[t], builder.add(cofs, aofs), _f32), vf)
                new.append(builder.call(fma, [sw, builder.call(fma, [f, sx, cg]), accs[t]]))
            nxt = builder.add(g, ir.Constant(_i64, 1))
            end_body = builder.block
            builder.branch(header)
            g.add_incoming(nxt, end_body)
            for t in range(nt):
                accs[t].add_incoming(new[t], end_body)

            builder.position_at_end(done)
            for t in range(nt):
                p = builder.bitcast(builder.gep(outp, [ir.Constant(_i64, L * t)]), vf.as_pointer())
                builder.store(accs[t], p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dot_tile


_dot1 = _make_dot_tile(1)
_dot2 = _make_dot_tile(2)
_dot4 = _make_dot_tile(4)


@njit(nogil=True, cache=_CACHE, inline="always")
def _quantize_group(src, i, c0, xq, xi, asc, g, G, split):
    """int8 absmax quantization of src[i, c0:c0+32] into row xi of xq (group g) and asc.

    asc[xi, g] = sx = absmax/127, asc[xi, G+g] = -8 * sx * sum(q). With split == 2 the residual
    src - sx*q is quantized the same way into row xi+1 (two int8 rows ~ 15 bits)."""
    m = np.float32(0.0)
    for c in range(32):
        m = max(m, abs(src[i, c0 + c]))
    sx = m / np.float32(127.0)
    inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
    xs = 0
    m2 = np.float32(0.0)
    for c in range(32):
        v = src[i, c0 + c]
        q = np.int32(np.rint(v * inv))
        xq[xi, 32 * g + c] = q
        xs += q
        m2 = max(m2, abs(v - np.float32(q) * sx))
    asc[xi, g] = sx
    asc[xi, G + g] = np.float32(-8.0) * sx * np.float32(xs)
    if split == 2:
        sx2 = m2 / np.float32(127.0)
        inv2 = np.float32(127.0) / m2 if m2 > 0 else np.float32(0.0)
        xs2 = 0
        for c in range(32):
            r = src[i, c0 + c] - np.float32(xq[xi, 32 * g + c]) * sx
            q2 = np.int32(np.rint(r * inv2))
            xq[xi + 1, 32 * g + c] = q2
            xs2 += q2
        asc[xi + 1, g] = sx2
        asc[xi + 1, G + g] = np.float32(-8.0) * sx2 * np.float32(xs2)


@njit(parallel=True, nogil=True, cache=_CACHE)
def quantize_rows(x, xq, asc, split):
    """x float32 [n, K] -> xq int8 [split*n, K], asc float32 [split*n, 2G] (see _quantize_group)."""
    G = x.shape[1] // 32
    for i in prange(x.shape[0]):
        for g in range(G):
            _quantize_group(x, i, 32 * g, xq, split * i, asc, g, G, split)


@njit(nogil=True, cache=_CACHE, inline="always")
def _dots(wp, ts, G, nt, xb, xs, ab, as_, toks, s, ob):
    """fp32 at address ob [nt, W] = the TPC tiles of 8 rows at wp (ts bytes apart) . rows toks[s:s+nt]
    of the activations at xb (int8, xs bytes per row) / ab (fp32 sx, c; as_ bytes per row)."""
    x0 = xb + toks[s] * xs
    a0 = ab + toks[s] * as_
    if nt == 4:
        _dot4(wp, ts, G, x0, xb + toks[s + 1] * xs, xb + toks[s + 2] * xs, xb + toks[s + 3] * xs,
              a0, ab + toks[s + 1] * as_, ab + toks[s + 2] * as_, ab + toks[s + 3] * as_, ob)
    elif nt == 2:
        _dot2(wp, ts, G, x0, xb + toks[s + 1] * xs, x0, x0, a0, ab + toks[s + 1] * as_, a0, a0, ob)
    else:
        _dot1(wp, ts, G, x0, x0, x0, x0, a0, a0, a0, a0, ob)


@njit(parallel=True, nogil=True, cache=_CACHE)
def gate_up(wg, wu, xq, xasc, xrow, split, estart, item_e, item_r0, rows_per_item, hq, hasc):
    """Stage 1: h = silu(gate x) * up x for every slot, quantized to int8 into (hq, hasc).

    wg/wu uint8 [E, I/8, GD, 144]; xq int8 [split*T, D], xasc f32 [split*T, 2*GD]; slots sorted
    by expert: expert e owns slots estart[e]:estart[e+1]; slot s reads activation rows
    xrow[split*s : split*s+split] (split 2: the int8 row and its residual row, whose dot
    products are added); item i = rows item_r0[i]:+rows_per_item (a multiple of 32) of expert
    item_e[i]; hq int8 [split*S, I], hasc f32 [split*S, 2*I/32]."""
    ntile, GD = wg.shape[1], wg.shape[2]
    GI = ntile * TILE // GROUP
    tb = np.int64(GD) * BLOCK  # bytes per tile
    wgb, wub = np.int64(wg.ctypes.data), np.int64(wu.ctypes.data)
    xb, ab = np.int64(xq.ctypes.data), np.int64(xasc.ctypes.data)
    xs, as_ = np.int64(xq.shape[1]), np.int64(xasc.shape[1] * 4)
    for it in prange(item_e.shape[0]):
        e = item_e[it]
        r0 = item_r0[it]
        s0, s1 = estart[e], estart[e + 1]
        h = np.empty((s1 - s0, rows_per_item), np.float32)
        ob = np.empty(4 * W, np.float32)
        og = np.empty(4 * W, np.float32)
        obp = np.int64(ob.ctypes.data)
        s = s0
        while s < s1:
            ns = 4 // split if s1 - s >= 4 // split else (2 // split if s1 - s >= 2 // split else 1)
            for tl in range(0, rows_per_item // TILE, TPC):
                tile = np.int64(e) * ntile + r0 // TILE + tl
                _dots(wgb + tile * tb, tb, GD, ns * split, xb, xs, ab, as_, xrow, split * s, obp)
                og[:] = ob
                _dots(wub + tile * tb, tb, GD, ns * split, xb, xs, ab, as_, xrow, split * s, obp)
                for j in range(ns):
                    for r in range(W):
                        gv = og[W * split * j + r]
                        uv = ob[W * split * j + r]
                        if split == 2:
                            gv += og[W * (2 * j + 1) + r]
                            uv += ob[W * (2 * j + 1) + r]
                        h[s + j - s0, 8 * tl + r] = gv / (np.float32(1.0) + np.exp(-gv)) * uv
            s += ns
        for j in range(s1 - s0):
            for q in range(rows_per_item // GROUP):
                _quantize_group(h, j, GROUP * q, hq, split * (s0 + j), hasc, r0 // GROUP + q, GI, split)


@njit(parallel=True, nogil=True, cache=_CACHE)
def down(wd, hq, hasc, slot_tok, slot_w, act_e, estart, y):
    """Stage 2: y[t, r] += w_slot * (down_e . h_slot) for the 32 rows r each item owns.

    wd uint8 [E, D/8, GI, 144]; hq/hasc from gate_up; act_e: experts that have slots;
    y float32 [T, D] (zeroed by the caller)."""
    ntile, GI = wd.shape[1], wd.shape[2]
    tb = np.int64(GI) * BLOCK
    wdb = np.int64(wd.ctypes.data)
    hb, ab = np.int64(hq.ctypes.data), np.int64(hasc.ctypes.data)
    hs, as_ = np.int64(hq.shape[1]), np.int64(hasc.shape[1] * 4)
    nitems = ntile * TILE // ROWS_PER_ITEM
    for it in prange(nitems):
        ob = np.empty(4 * W, np.float32)
        obp = np.int64(ob.ctypes.data)
        ids = np.empty(4, np.int64)
        for ei in range(act_e.shape[0]):
            e = act_e[ei]
            s0, s1 = estart[e], estart[e + 1]
            s = s0
            while s < s1:
                nt = 4 if s1 - s >= 4 else (2 if s1 - s >= 2 else 1)
                for j in range(nt):
                    ids[j] = s + j  # hq rows are slots
                for tl in range(0, ROWS_PER_ITEM // TILE, TPC):
                    t8 = it * (ROWS_PER_ITEM // TILE) + tl
                    _dots(wdb + (np.int64(e) * ntile + t8) * tb, tb, GI, nt, hb, hs, ab, as_, ids, 0, obp)
                    for j in range(nt):
                        tok = slot_tok[s + j]
                        wgt = slot_w[s + j]
                        for r in range(W):
                            y[tok, 8 * t8 + r] += wgt * ob[W * j + r]
                s += nt


@njit(parallel=True, nogil=True, cache=_CACHE)
def down_slots(wd, hq, hasc, estart, item_e, item_r0, rows_per_item, out):
    """Stage 2 for few slots (decode): out[s, r] = down_e . h_s, items = (expert, rows).

    Each item streams one contiguous run of an expert's rows (long runs suit the hardware
    prefetchers better than ``down``'s 8 experts x 32 rows); the caller adds w_s * out[s]."""
    ntile, GI = wd.shape[1], wd.shape[2]
    tb = np.int64(GI) * BLOCK
    wdb = np.int64(wd.ctypes.data)
    hb, ab = np.int64(hq.ctypes.data), np.int64(hasc.ctypes.data)
    hs, as_ = np.int64(hq.shape[1]), np.int64(hasc.shape[1] * 4)
    for it in prange(item_e.shape[0]):
        e = item_e[it]
        r0 = item_r0[it]
        s0, s1 = estart[e], estart[e + 1]
        ob = np.empty(4 * W, np.float32)
        obp = np.int64(ob.ctypes.data)
        ids = np.empty(4, np.int64)
        s = s0
        while s < s1:
            nt = 4 if s1 - s >= 4 else (2 if s1 - s >= 2 else 1)
            for j in range(nt):
                ids[j] = s + j
            for t8 in range(r0 // TILE, (r0 + rows_per_item) // TILE, TPC):
                _dots(wdb + (np.int64(e) * ntile + t8) * tb, tb, GI, nt, hb, hs, ab, as_, ids, 0, obp)
                for j in range(nt):
                    for r in range(W):
                        out[s + j, 8 * t8 + r] = ob[W * j + r]
            s += nt


@njit(nogil=True, cache=_CACHE)
def combine_slots(out, slot_tok, slot_w, y):
    """y[slot_tok[s]] += slot_w[s] * out[s] (after down_slots; a few slots, calling thread)."""
    for s in range(out.shape[0]):
        t = slot_tok[s]
        w = slot_w[s]
        for r in range(out.shape[1]):
            y[t, r] += w * out[s, r]


@njit(nogil=True, cache=_CACHE)
def quantize_rows_serial(x, xq, asc, split):
    """quantize_rows on the calling thread (a few tokens: cheaper than waking the pool)."""
    G = x.shape[1] // 32
    for i in range(x.shape[0]):
        for g in range(G):
            _quantize_group(x, i, 32 * g, xq, split * i, asc, g, G, split)
