/* llama.cpp's CPU MoE FFN (ggml_mul_mat_id graph) as a small benchmark / check program.

Built and driven by tools/bench_llamacpp.py (checked by tests/test_bench_llamacpp.py), linked
against the ggml of llama.cpp as vendored in the llama-cpp-python sdist. The graph follows
llama.cpp's build_moe_ffn (src/llama-graph.cpp, separate gate/up experts, SiLU, no biases, weights
after the FFN) for a DeepSeek-V3 layer:
    up = mul_mat_id(up_exps [D, I, E], x [D, 1, T], ids [K, T]);  gate = mul_mat_id(gate_exps, ...)
    par = swiglu_split(gate, up);  y = mul_mat_id(down_exps [I, D, E], par, ids) * w [1, K, T]
    out = sum over the K views of y                                                   -> [D, T]
Weights sit in a plain CPU buffer or in the CPU backend's extra buffer type "CPU_REPACK" (the
interleaved layouts, ggml-cpu/repack.cpp), picked by repack=0|1.

    llamacpp_moe bench type=q4_0|q4_K repack=0|1 threads=N D= I= E= K= steps= windows= [T=512,2048 ids=DIR]
        decode: batch 1, token s uses experts (K*s + k) % E, best of `windows` runs of `steps` tokens;
        prefill: for each T, routing read from DIR/ids_T.i32 (int32 [T, K]); one warm-up-free timed run
        (the compute buffer is touched first). Random weights (speed does not depend on them).
        Prints one JSON object: seconds per decode token, seconds per prefill run, bytes per expert.
    llamacpp_moe check type=q4_0|q4_K repack=0|1 threads=N D= I= E= K= T= dir=DIR
        weights from DIR/{gate,up,down}.bin (q4_0: ggml blocks as stored; q4_K: float32, quantized
        here with ggml_quantize_chunk and written back dequantized to DIR/{gate,up,down}.deq.f32), DIR/x.f32 [T, D], ids.i32 [T, K], w.f32 [T, K]; writes out.f32 [T, D].
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <time.h>
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

static const char *arg(int argc, char **argv, const char *key, const char *dflt) {
    size_t n = strlen(key);
    for (int i = 2; i < argc; i++)
        if (!strncmp(argv[i], key, n) && argv[i][n] == '=') return argv[i] + n + 1;
    if (!dflt) { fprintf(stderr, "missing %s=\n", key); exit(2); }
    return dflt;
}
static long iarg(int argc, char **argv, const char *key, const char *dflt) { return atol(arg(argc, argv, key, dflt)); }

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64(void) {  /* xorshift64* */
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static void *read_file(const char *dir, const char *name, size_t nbytes) {
    char path[4096]; snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb"); if (!f) { fprintf(stderr, "cannot open %s\n", path); exit(3); }
    void *buf = malloc(nbytes);
    if (fread(buf, 1, nbytes, f) != nbytes) { fprintf(stderr, "short read %s\n", path); exit(3); }
    fclose(f); return buf;
}

/* random but valid blocks: q4_0 = fp16 d + 16 bytes of nibbles; q4_K = fp16 d, dmin + 12 scale bytes + 128 */
static void fill_random(enum ggml_type type, uint8_t *dst, size_t nbytes) {
    size_t bs = ggml_type_size(type);
    ggml_fp16_t d = ggml_fp32_to_fp16(0.01f), dmin = ggml_fp32_to_fp16(0.001f);
    for (size_t off = 0; off + bs <= nbytes; off += bs) {
        uint8_t *b = dst + off;
        for (size_t j = 0; j < bs; j += 8) { uint64_t r = next_u64(); memcpy(b + j, &r, bs - j < 8 ? bs - j : 8); }
        memcpy(b, &d, 2);
        if (type == GGML_TYPE_Q4_K) memcpy(b + 2, &dmin, 2);
    }
}

typedef struct {
    struct ggml_context *ctx;
    struct ggml_cgraph *gf;
    struct ggml_tensor *x, *ids, *w, *out;
} moe_graph;

static moe_graph build_graph(struct ggml_tensor *gate, struct ggml_tensor *up, struct ggml_tensor *down,
                             int D, int K, int T) {
    moe_graph g;
    struct ggml_init_params p = { ggml_tensor_overhead() * 64 + ggml_graph_overhead(), NULL, true };
    g.ctx = ggml_init(p);
    g.x = ggml_new_tensor_2d(g.ctx, GGML_TYPE_F32, D, T); ggml_set_input(g.x);
    g.ids = ggml_new_tensor_2d(g.ctx, GGML_TYPE_I32, K, T); ggml_set_input(g.ids);
    g.w = ggml_new_tensor_3d(g.ctx, GGML_TYPE_F32, 1, K, T); ggml_set_input(g.w);
    struct ggml_tensor *cur = ggml_reshape_3d(g.ctx, g.x, D, 1, T);
    struct ggml_tensor *u = ggml_mul_mat_id(g.ctx, up, cur, g.ids);       /* [I, K, T] */
    struct ggml_tensor *gt = ggml_mul_mat_id(g.ctx, gate, cur, g.ids);    /* [I, K, T] */
    struct ggml_tensor *par = ggml_swiglu_split(g.ctx, gt, u);            /* silu(gate) * up */
    struct ggml_tensor *y = ggml_mul_mat_id(g.ctx, down, par, g.ids);     /* [D, K, T] */
    y = ggml_mul(g.ctx, y, g.w);
    g.gf = ggml_new_graph(g.ctx);
    ggml_build_forward_expand(g.gf, y);
    struct ggml_tensor *views[64] = { 0 };
    for (int k = 0; k < K; k++) {
        views[k] = ggml_view_2d(g.ctx, y, D, T, y->nb[2], k * y->nb[1]);
        ggml_build_forward_expand(g.gf, views[k]);
    }
    struct ggml_tensor *out = views[0];
    for (int k = 1; k < K; k++) { out = ggml_add(g.ctx, out, views[k]); ggml_build_forward_expand(g.gf, out); }
    if (K == 1) out = ggml_cont(g.ctx, out);
    ggml_set_output(out);
    ggml_build_forward_expand(g.gf, out);
    g.out = out;
    return g;
}

static ggml_backend_buffer_type_t weight_buft(int repack) {
    if (!repack) return ggml_backend_cpu_buffer_type();
    ggml_backend_dev_t dev = ggml_backend_reg_dev_get(ggml_backend_cpu_reg(), 0);
    ggml_backend_dev_get_extra_bufts_t fn = (ggml_backend_dev_get_extra_bufts_t)
        ggml_backend_reg_get_proc_address(ggml_backend_cpu_reg(), "ggml_backend_dev_get_extra_bufts");
    for (ggml_backend_buffer_type_t *b = fn ? fn(dev) : NULL; b && *b; b++)
        if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK")) return *b;
    fprintf(stderr, "no CPU_REPACK buffer type in this build\n"); exit(4);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s bench|check key=value ...\n", argv[0]); return 2; }
    int check = !strcmp(argv[1], "check");
    const char *tname = arg(argc, argv, "type", "q4_0");
    enum ggml_type type = !strcmp(tname, "q4_K") ? GGML_TYPE_Q4_K : GGML_TYPE_Q4_0;
    int repack = iarg(argc, argv, "repack", "0"), threads = iarg(argc, argv, "threads", "1");
    int D = iarg(argc, argv, "D", NULL), I = iarg(argc, argv, "I", NULL);
    int E = iarg(argc, argv, "E", NULL), K = iarg(argc, argv, "K", NULL);
    if (K > 64) { fprintf(stderr, "K <= 64\n"); return 2; }
    double t_setup = now();

    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, threads);
    struct ggml_init_params wp = { ggml_tensor_overhead() * 8, NULL, true };
    struct ggml_context *wctx = ggml_init(wp);
    struct ggml_tensor *gate = ggml_new_tensor_3d(wctx, type, D, I, E);
    struct ggml_tensor *up = ggml_new_tensor_3d(wctx, type, D, I, E);
    struct ggml_tensor *down = ggml_new_tensor_3d(wctx, type, I, D, E);
    ggml_backend_buffer_type_t buft = weight_buft(repack);
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft);
    if (!wbuf) { fprintf(stderr, "weight allocation failed\n"); return 5; }
    ggml_backend_buffer_set_usage(wbuf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    struct ggml_tensor *ws[3] = { gate, up, down };
    const char *wnames[3] = { "gate.bin", "up.bin", "down.bin" };
    const char *dir = check ? arg(argc, argv, "dir", NULL) : NULL;
    for (int i = 0; i < 3; i++) {  /* whole tensor in one set: the repack buffer converts on set */
        size_t nb = ggml_nbytes(ws[i]);
        void *host;
        if (!check) {
            host = malloc(nb); fill_random(type, host, nb);
        } else if (type == GGML_TYPE_Q4_0) {
            host = read_file(dir, wnames[i], nb);
        } else {
            int64_t rows = ws[i]->ne[1] * ws[i]->ne[2], per = ws[i]->ne[0];
            float *f = read_file(dir, wnames[i], (size_t)rows * per * sizeof(float));
            host = malloc(nb);
            ggml_quantize_chunk(type, f, host, 0, rows, per, NULL);
            ggml_get_type_traits(type)->to_float(host, f, rows * per);   /* what the kernels see */
            char name[64]; snprintf(name, sizeof name, "%.*s.deq.f32", (int)(strlen(wnames[i]) - 4), wnames[i]);
            char path[4096]; snprintf(path, sizeof path, "%s/%s", dir, name);
            FILE *fo = fopen(path, "wb"); fwrite(f, sizeof(float), (size_t)rows * per, fo); fclose(fo);
            free(f);
        }
        ggml_backend_tensor_set(ws[i], host, 0, nb);
        free(host);
    }
    ggml_gallocr_t galloc = ggml_gallocr_new(ggml_backend_cpu_buffer_type());
    t_setup = now() - t_setup;

    if (check) {
        int T = iarg(argc, argv, "T", NULL);
        moe_graph g = build_graph(gate, up, down, D, K, T);
        if (!ggml_gallocr_alloc_graph(galloc, g.gf)) { fprintf(stderr, "alloc failed\n"); return 5; }
        float *x = read_file(dir, "x.f32", (size_t)T * D * 4), *w = read_file(dir, "w.f32", (size_t)T * K * 4);
        int32_t *ids = read_file(dir, "ids.i32", (size_t)T * K * 4);
        ggml_backend_tensor_set(g.x, x, 0, ggml_nbytes(g.x));
        ggml_backend_tensor_set(g.ids, ids, 0, ggml_nbytes(g.ids));
        ggml_backend_tensor_set(g.w, w, 0, ggml_nbytes(g.w));
        if (ggml_backend_graph_compute(backend, g.gf) != GGML_STATUS_SUCCESS) return 6;
        float *out = malloc((size_t)T * D * 4);
        ggml_backend_tensor_get(g.out, out, 0, (size_t)T * D * 4);
        char path[4096]; snprintf(path, sizeof path, "%s/out.f32", dir);
        FILE *f = fopen(path, "wb"); fwrite(out, 4, (size_t)T * D, f); fclose(f);
        printf("{\"ok\": true, \"type\": \"%s\", \"repack\": %d, \"weight_buffer\": \"%s\"}\n",
               tname, repack, ggml_backend_buft_name(buft));
        return 0;
    }

    int steps = iarg(argc, argv, "steps", "0"), windows = iarg(argc, argv, "windows", "1");
    const char *Ts = arg(argc, argv, "T", ""), *idsdir = arg(argc, argv, "ids", "");
    size_t expert_bytes = (ggml_nbytes(gate) + ggml_nbytes(up) + ggml_nbytes(down)) / E;
    printf("{\"type\": \"%s\", \"repack\": %d, \"weight_buffer\": \"%s\", \"threads\": %d, \"E\": %d, "
           "\"expert_bytes\": %zu, \"setup_s\": %.3f", tname, repack, ggml_backend_buft_name(buft), threads, E,
           expert_bytes, t_setup);
    /* prefill first, largest T first, so the compute buffer is sized once and touched before timing */
    int Tv[16], nT = 0;
    for (const char *s = Ts; *s && nT < 16; ) { Tv[nT++] = atoi(s); while (*s && *s != ',') s++; if (*s) s++; }
    if (nT) {
        int Tmax = 0; for (int i = 0; i < nT; i++) if (Tv[i] > Tmax) Tmax = Tv[i];
        moe_graph gm = build_graph(gate, up, down, D, K, Tmax);
        ggml_gallocr_alloc_graph(galloc, gm.gf);
        for (int i = 0; i < ggml_graph_n_nodes(gm.gf); i++) {   /* touch every page of the compute buffer */
            struct ggml_tensor *n = ggml_graph_node(gm.gf, i);
            if (n->data && !n->view_src) memset(n->data, 0, ggml_nbytes(n));
        }
        ggml_free(gm.ctx);
        printf(", \"prefill_s\": {");
        for (int i = 0; i < nT; i++) {
            int T = Tv[i];
            moe_graph g = build_graph(gate, up, down, D, K, T);
            ggml_gallocr_alloc_graph(galloc, g.gf);
            char name[64]; snprintf(name, sizeof name, "ids_%d.i32", T);
            int32_t *ids = read_file(idsdir, name, (size_t)T * K * 4);
            float *x = malloc((size_t)T * D * 4), *w = malloc((size_t)T * K * 4);
            for (size_t j = 0; j < (size_t)T * D; j++) x[j] = (float)((int64_t)(next_u64() >> 40) - (1 << 23)) / (1 << 23);
            for (size_t j = 0; j < (size_t)T * K; j++) w[j] = 1.0f / K;
            ggml_backend_tensor_set(g.x, x, 0, ggml_nbytes(g.x));
            ggml_backend_tensor_set(g.ids, ids, 0, ggml_nbytes(g.ids));
            ggml_backend_tensor_set(g.w, w, 0, ggml_nbytes(g.w));
            double t0 = now();
            if (ggml_backend_graph_compute(backend, g.gf) != GGML_STATUS_SUCCESS) return 6;
            printf("%s\"%d\": %.6f", i ? ", " : "", T, now() - t0);
            fflush(stdout);
            free(ids); free(x); free(w); ggml_free(g.ctx);
        }
        printf("}");
    }
    if (steps > 0) {
        moe_graph g = build_graph(gate, up, down, D, K, 1);
        ggml_gallocr_alloc_graph(galloc, g.gf);
        float *x = malloc((size_t)D * 4), w[64];
        for (int j = 0; j < D; j++) x[j] = (float)((int64_t)(next_u64() >> 40) - (1 << 23)) / (1 << 23);
        for (int k = 0; k < K; k++) w[k] = 1.0f / K;
        ggml_backend_tensor_set(g.x, x, 0, ggml_nbytes(g.x));
        ggml_backend_tensor_set(g.w, w, 0, ggml_nbytes(g.w));
        int32_t ids[64];
        double best = 1e30;
        for (int win = -1; win < windows; win++) {    /* win -1: warm-up token */
            double t0 = now();
            for (int s = 0; s < (win < 0 ? 1 : steps); s++) {
                int tok = win < 0 ? 0 : s + 2;
                for (int k = 0; k < K; k++) ids[k] = (int32_t)(((long)K * tok + k) % E);
                ggml_backend_tensor_set(g.ids, ids, 0, ggml_nbytes(g.ids));
                if (ggml_backend_graph_compute(backend, g.gf) != GGML_STATUS_SUCCESS) return 6;
            }
            double dt = now() - t0;
            if (win >= 0 && dt < best) best = dt;
        }
        printf(", \"decode_s_per_token\": %.7f", best / steps);
        free(x); ggml_free(g.ctx);
    }
    printf("}\n");
    ggml_gallocr_free(galloc); ggml_backend_buffer_free(wbuf); ggml_free(wctx); ggml_backend_free(backend);
    return 0;
}
