"""Numba INT4 x INT8 routed-expert kernels (AVX2 integer dot products emitted as LLVM IR).

Math per token t and chosen expert e (weights in the layout of ``layout.py``):
    y[t] += w[t,k] * down_e( silu(gate_e x_t) * up_e x_t )
Activations (x, and the intermediate h) are quantized per group of 32 to int8 with one fp32
scale (absmax / 127, round to nearest). A group's dot product is then
    sum_c q_w[c] x[c] * sw * sx = sw * (sx * sum_c u[c] xq[c]  -  8 sx sum_c xq[c])
where u = q_w + 8 in [0, 15] is the stored nibble: ``vpmaddubsw`` (u8 x s8 -> s16 pairs, no
saturation since 2*15*127 < 2^15) then ``vpmaddwd`` with ones (-> 8 x s32), converted to fp32
and multiplied by sw*sx in an FMA; the correction c = -8 sx sum(xq) is precomputed per token and
group and enters as one FMA per 8 groups (sw[8] * c[8]).

Work split (all cores, ``prange``, GIL released):
  1. ``quantize_rows``: x -> int8 + per-group (sx, c), one row per token (or per slot).
  2. ``gate_up``: items = (expert, chunk of intermediate rows); each weight row is loaded once
     and used for all the tokens routed to that expert, 4 tokens at a time (1 or 2 at the tail),
     so prefill reads each expert once and decode (1 token) streams it once.
  3. ``down``: items = chunks of output rows; each item loops over the active experts and adds
     w[t,k] * dot into y[t, rows] it owns (no races, deterministic order).
Decode (T=1) and prefill share this code; grouping tokens by expert is done by the caller
(``experts.py``) as a slot order sorted by expert.

The 8-group inner loop is LLVM IR (``_dot_tile``); leftover groups (G % 8, only at toy sizes) use
plain Numba (``_tail_dot``). On CPUs without AVX2 the IR uses generic vector ops instead.
Checked by tests/test_cpu_kernels.py; speed by tools/bench_experts.py.
"""
import numpy as np
import numba
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from llvmlite import ir
import llvmlite.binding as llvm

GROUP = 32
GROUPS_PER_BLOCK = 8  # the IR loop's unit: 8 groups = 256 weights = 128 bytes + 16 scale bytes
ROW_CHUNK = 16        # rows per work item (both stages)
HAS_AVX2 = bool(llvm.get_host_cpu_features().get("avx2", False))

_i8, _i16, _i32, _i64, _f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_v32i8, _v16i8 = ir.VectorType(_i8, 32), ir.VectorType(_i8, 16)
_v16i16, _v8i16 = ir.VectorType(_i16, 16), ir.VectorType(_i16, 8)
_v8i32, _v8f32 = ir.VectorType(_i32, 8), ir.VectorType(_f32, 8)


def _splat(ty, value):
    return ir.Constant(ty, [value] * ty.count)


def _load(builder, base, offset, vty):
    """Unaligned load of vector type vty from i8* base + offset (offset: i64 value or int)."""
    if isinstance(offset, int):
        offset = ir.Constant(_i64, offset)
    p = builder.gep(base, [offset])
    return builder.load(builder.bitcast(p, vty.as_pointer()), align=1)


def _dot_u8s8(builder, module, u, x):
    """<32 x u8> . <32 x s8> -> <8 x i32> partial sums (lanes summed later)."""
    if HAS_AVX2:
        f1 = cgutils.get_or_insert_function(module, ir.FunctionType(_v16i16, [_v32i8, _v32i8]),
                                            "llvm.x86.avx2.pmadd.ub.sw")
        f2 = cgutils.get_or_insert_function(module, ir.FunctionType(_v8i32, [_v16i16, _v16i16]),
                                            "llvm.x86.avx2.pmadd.wd")
        return builder.call(f2, [builder.call(f1, [u, x]), _splat(_v16i16, 1)])
    v32i32 = ir.VectorType(_i32, 32)
    prod = builder.mul(builder.zext(u, v32i32), builder.sext(x, v32i32))
    parts = [builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(_i32, 8), list(range(8 * j, 8 * j + 8))))
             for j in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _hsum(builder, v):
    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 4), [0, 1, 2, 3]))
    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 4), [4, 5, 6, 7]))
    s4 = builder.fadd(lo, hi)
    s2 = builder.fadd(s4, builder.shuffle_vector(s4, s4, ir.Constant(ir.VectorType(_i32, 4), [2, 3, 2, 3])))
    s1 = builder.fadd(s2, builder.shuffle_vector(s2, s2, ir.Constant(ir.VectorType(_i32, 4), [1, 1, 1, 1])))
    return builder.extract_element(s1, ir.Constant(_i32, 0))


def _make_dot_tile(nt):
    """IR for nt tokens x one weight row over nblk blocks of 8 groups.

    Arguments (all integers; pointers as addresses): w (row's bytes), s (row's bf16 scales),
    nblk, G, x_0..x_3 (tokens' int8 rows), a_0..a_3 (tokens' fp32 [sx[G], c[G]]), out (fp32[nt]).
    Unused token slots (j >= nt) are ignored."""
    nacc = {1: 4, 2: 2}.get(nt, 1)  # independent FMA chains per token

    @intrinsic
    def dot_tile(typingctx, w, s, nblk, G, x0, x1, x2, x3, a0, a1, a2, a3, out):
        sig = types.void(w, s, nblk, G, x0, x1, x2, x3, a0, a1, a2, a3, out)

        def codegen(context, builder, signature, args):
            module = builder.module
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(_v8f32, [_v8f32] * 3), "llvm.fma.v8f32")
            i8p = _i8.as_pointer()
            args = [builder.sext(a, _i64) if a.type.width < 64 else a for a in args]
            wp, sp, nb, ng = builder.inttoptr(args[0], i8p), builder.inttoptr(args[1], i8p), args[2], args[3]
            xps = [builder.inttoptr(a, i8p) for a in args[4:4 + nt]]
            aps = [builder.inttoptr(a, i8p) for a in args[8:8 + nt]]
            outp = builder.inttoptr(args[12], _f32.as_pointer())
            cofs = builder.mul(ng, ir.Constant(_i64, 4))  # byte offset of c[] after sx[]
            entry = builder.block
            header = builder.append_basic_block("dt.header")
            body = builder.append_basic_block("dt.body")
            done = builder.append_basic_block("dt.done")
            builder.branch(header)

            builder.position_at_end(header)
            blk = builder.phi(_i64)
            blk.add_incoming(ir.Constant(_i64, 0), entry)
            accs = [[builder.phi(_v8f32) for _ in range(nacc)] for _ in range(nt)]
            for row in accs:
                for a in row:
                    a.add_incoming(_splat(_v8f32, 0.0), entry)
            builder.cbranch(builder.icmp_signed("<", blk, nb), body, done)

            builder.position_at_end(body)
            cur = [list(row) for row in accs]
            s8 = _load(builder, sp, builder.mul(blk, ir.Constant(_i64, 16)), _v8i16)
            sw = builder.bitcast(builder.shl(builder.zext(s8, _v8i32), _splat(_v8i32, 16)), _v8f32)
            sofs = builder.mul(blk, ir.Constant(_i64, 32))
            ds = []
            for t in range(nt):
                sx = _load(builder, aps[t], sofs, _v8f32)
                cc = _load(builder, aps[t], builder.add(cofs, sofs), _v8f32)
                ds.append(builder.fmul(sw, sx))
                cur[t][0] = builder.call(fma, [sw, cc, cur[t][0]])
            wofs = builder.mul(blk, ir.Constant(_i64, 128))
            xofs = builder.mul(blk, ir.Constant(_i64, 256))
            k = 0
            for p in range(4):
                v = _load(builder, wp, builder.add(wofs, ir.Constant(_i64, 32 * p)), _v32i8)
                lo = builder.and_(v, _splat(_v32i8, 15))
                hi = builder.and_(builder.lshr(v, _splat(_v32i8, 4)), _splat(_v32i8, 15))
                for half, u in ((0, lo), (1, hi)):
                    g = 2 * p + half
                    for t in range(nt):
                        xv = _load(builder, xps[t], builder.add(xofs, ir.Constant(_i64, 64 * p + 32 * half)), _v32i8)
                        f = builder.sitofp(_dot_u8s8(builder, module, u, xv), _v8f32)
                        d = builder.shuffle_vector(ds[t], ds[t], ir.Constant(_v8i32, [g] * 8))
                        j = k % nacc
                        cur[t][j] = builder.call(fma, [f, d, cur[t][j]])
                    k += 1
            nxt = builder.add(blk, ir.Constant(_i64, 1))
            end_body = builder.block
            builder.branch(header)
            blk.add_incoming(nxt, end_body)
            for t in range(nt):
                for j in range(nacc):
                    accs[t][j].add_incoming(cur[t][j], end_body)

            builder.position_at_end(done)
            for t in range(nt):
                tot = accs[t][0]
                for j in range(1, nacc):
                    tot = builder.fadd(tot, accs[t][j])
                builder.store(_hsum(builder, tot), builder.gep(outp, [ir.Constant(_i64, t)]))
            return context.get_dummy_value()

        return sig, codegen

    return dot_tile


_dot1 = _make_dot_tile(1)
_dot2 = _make_dot_tile(2)
_dot4 = _make_dot_tile(4)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bf16 bit pattern (any integer type) -> float32, by a 16-bit shift and a bitcast."""
    def codegen(context, builder, signature, args):
        v = args[0]
        v = builder.zext(v, _i32) if v.type.width < 32 else builder.trunc(v, _i32) if v.type.width > 32 else v
        return builder.bitcast(builder.shl(v, ir.Constant(_i32, 16)), _f32)
    return types.float32(bits), codegen


@njit(nogil=True, cache=True, inline="always")
def _tail_dot(w, s, e, row, g0, xq, t, asc):
    """Groups g0..G-1 of w[e, row] against row t of (xq, asc) in plain Numba.

    Used for the groups after the last full block of 8 (toy sizes) and where AVX2 is missing."""
    G = s.shape[2]
    npair = G // 2
    acc = np.float32(0.0)
    for g in range(g0, G):
        isum = 0
        if g < 2 * npair:
            base = 32 * (g // 2)
            sh = 4 * (g % 2)
            for b in range(32):
                isum += np.int32((w[e, row, base + b] >> sh) & 15) * np.int32(xq[t, 32 * g + b])
        else:
            base = 32 * npair
            for b in range(16):
                byte = w[e, row, base + b]
                isum += np.int32(byte & 15) * np.int32(xq[t, 32 * g + b])
                isum += np.int32(byte >> 4) * np.int32(xq[t, 32 * g + 16 + b])
        acc += _bf16_to_f32(s[e, row, g]) * (asc[t, g] * np.float32(isum) + asc[t, G + g])
    return acc


@njit(nogil=True, cache=True, inline="always")
def _quantize_group(src, i, c0, xq, xi, asc, ai, g, G):
    """int8 absmax quantization of src[i, c0:c0+32] into xq[xi, 32g:32g+32], asc[ai, g], asc[ai, G+g]."""
    m = np.float32(0.0)
    for c in range(32):
        m = max(m, abs(src[i, c0 + c]))
    sx = m / np.float32(127.0)
    inv = np.float32(127.0) / m if m > 0 else np.float32(0.0)
    xs = 0
    for c in range(32):
        q = np.int32(np.rint(src[i, c0 + c] * inv))
        xq[xi, 32 * g + c] = q
        xs += q
    asc[ai, g] = sx
    asc[ai, G + g] = np.float32(-8.0) * sx * np.float32(xs)


@njit(parallel=True, nogil=True, cache=True)
def quantize_rows(x, xq, asc):
    """x float32 [n, K] -> xq int8 [n, K], asc float32 [n, 2G] = (sx per group, -8*sx*sum(xq))."""
    G = x.shape[1] // 32
    for i in prange(x.shape[0]):
        for g in range(G):
            _quantize_group(x, i, 32 * g, xq, i, asc, i, g, G)


@njit(nogil=True, cache=True, inline="always")
def _dots(wp, sp, nblk, G, nt, xb, xs, ab, as_, toks, s, ob):
    """fp32 at address ob [0:nt] = one weight row (w at wp, scales at sp) . rows toks[s:s+nt] of
    the activations at xb (int8, xs bytes per row) / ab (fp32 sx and c, as_ bytes per row),
    over the first nblk blocks of 8 groups."""
    x0 = xb + toks[s] * xs
    a0 = ab + toks[s] * as_
    if nt == 4:
        x1 = xb + toks[s + 1] * xs
        x2 = xb + toks[s + 2] * xs
        x3 = xb + toks[s + 3] * xs
        _dot4(wp, sp, nblk, G, x0, x1, x2, x3, a0, ab + toks[s + 1] * as_, ab + toks[s + 2] * as_,
              ab + toks[s + 3] * as_, ob)
    elif nt == 2:
        x1 = xb + toks[s + 1] * xs
        _dot2(wp, sp, nblk, G, x0, x1, x0, x0, a0, ab + toks[s + 1] * as_, a0, a0, ob)
    else:
        _dot1(wp, sp, nblk, G, x0, x0, x0, x0, a0, a0, a0, a0, ob)


@njit(parallel=True, nogil=True, cache=True)
def gate_up(wg, sg, wu, su, xq, xasc, slot_tok, estart, item_e, item_r0, hq, hasc, use_simd):
    """Stage 1: h = silu(gate x) * up x for every slot, quantized to int8 into (hq, hasc).

    wg/wu uint8 [E, I, 16*GD], sg/su uint16 [E, I, GD]; xq int8 [T, D], xasc f32 [T, 2*GD];
    slots sorted by expert: expert e owns slots estart[e]:estart[e+1], token slot_tok[s];
    item i = rows item_r0[i]:+32 of expert item_e[i]; hq int8 [S, I], hasc f32 [S, 2*GI]."""
    I = wg.shape[1]
    GD = sg.shape[2]
    GI = I // 32
    nblk = GD // 8 if use_simd else 0
    rb = np.int64(wg.shape[2])
    wgb, sgb = np.int64(wg.ctypes.data), np.int64(sg.ctypes.data)
    wub, sub = np.int64(wu.ctypes.data), np.int64(su.ctypes.data)
    xb, ab = np.int64(xq.ctypes.data), np.int64(xasc.ctypes.data)
    xs, as_ = np.int64(xq.shape[1]), np.int64(xasc.shape[1] * 4)
    for it in prange(item_e.shape[0]):
        e = item_e[it]
        r0 = item_r0[it]
        s0, s1 = estart[e], estart[e + 1]
        h = np.empty((s1 - s0, 32), np.float32)
        ob = np.empty(8, np.float32)
        obp = np.int64(ob.ctypes.data)
        og = np.empty(4, np.float32)
        s = s0
        while s < s1:
            nt = 4 if s1 - s >= 4 else (2 if s1 - s >= 2 else 1)
            for r in range(r0, r0 + 32):
                row = np.int64(e) * I + r
                _dots(wgb + row * rb, sgb + row * GD * 2, nblk, GD, nt, xb, xs, ab, as_, slot_tok, s, obp)
                for j in range(nt):
                    og[j] = ob[j]
                _dots(wub + row * rb, sub + row * GD * 2, nblk, GD, nt, xb, xs, ab, as_, slot_tok, s, obp)
                for j in range(nt):
                    gv = og[j] + _tail_dot(wg, sg, e, r, 8 * nblk, xq, slot_tok[s + j], xasc)
                    uv = ob[j] + _tail_dot(wu, su, e, r, 8 * nblk, xq, slot_tok[s + j], xasc)
                    h[s + j - s0, r - r0] = gv / (np.float32(1.0) + np.exp(-gv)) * uv
            s += nt
        for j in range(s1 - s0):
            _quantize_group(h, j, 0, hq, s0 + j, hasc, s0 + j, r0 // 32, GI)


@njit(parallel=True, nogil=True, cache=True)
def down(wd, sd, hq, hasc, slot_tok, slot_w, act_e, estart, y, rows_per_item, use_simd):
    """Stage 2: y[t, r] += w_slot * (down_e . h_slot) for rows r owned by each item.

    wd uint8 [E, D, 16*GI], sd uint16 [E, D, GI]; hq/hasc from gate_up; act_e: experts with
    slots; y float32 [T, D] (zeroed by the caller)."""
    D = wd.shape[1]
    GI = sd.shape[2]
    nblk = GI // 8 if use_simd else 0
    rb = np.int64(wd.shape[2])
    wdb, sdb = np.int64(wd.ctypes.data), np.int64(sd.ctypes.data)
    hb, ab = np.int64(hq.ctypes.data), np.int64(hasc.ctypes.data)
    hs, as_ = np.int64(hq.shape[1]), np.int64(hasc.shape[1] * 4)
    nitems = (D + rows_per_item - 1) // rows_per_item
    for it in prange(nitems):
        r0 = it * rows_per_item
        r1 = min(D, r0 + rows_per_item)
        ob = np.empty(8, np.float32)
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
                for r in range(r0, r1):
                    row = np.int64(e) * D + r
                    _dots(wdb + row * rb, sdb + row * GI * 2, nblk, GI, nt, hb, hs, ab, as_, ids, 0, obp)
                    for j in range(nt):
                        v = ob[j] + _tail_dot(wd, sd, e, r, 8 * nblk, hq, s + j, hasc)
                        y[slot_tok[s + j], r] += slot_w[s + j] * v
                s += nt
