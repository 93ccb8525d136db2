/* CPU kernels where PyTorch has no single op for the job, or a slower one (kernels.py calls
them and says when).

decode_attention: one decode step's attention for N sequences reading a paged KV cache
(model.KVCache) in place. Each sequence stores the key and value of its new token, then its
query attends to every position it has, block by block through its block table. Done with
torch ops this is a store, a gather of every block into one buffer, and scaled-dot-product
attention over the copy: three passes over the keys and values and a dozen small ops per
layer, which at batch 1 to 8 cost more than the arithmetic.

int8_linear and linear_f32: the matmuls of a decode step, which must stream every weight
from memory; laid out so that each thread reads one sequential stream (sections below).

Plain C with OpenMP: the module links libgomp by soname, so once torch is imported it shares
torch's OpenMP runtime and thread count (torch.set_num_threads) instead of starting a second
team. Built by `pip install` (setup.py). Each kernel is compiled for more than one instruction
set and the caller names the one to run (kernels.py, from the cap the ISA benchmarks set:
torch's for attention and fp32, fbgemm's for int8), so that an AVX-512 host capped at AVX2
runs AVX2 code.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define X86 1
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define X86 0
#endif

/* Cache layout of one layer: [key|value, head, block, position in block, head_dim]. */
typedef struct {
    const float *qkv;      /* [N, qkv_stride]: query, key, value of each new token */
    float *kv;             /* one layer of the cache */
    const int64_t *blocks; /* [N, width] block tables */
    const int64_t *pos;    /* [N] position of each new token */
    float *out;            /* [N, H * head_dim] */
    int64_t n, heads, head_dim, num_blocks, block_size, width, qkv_stride;
    float scale;
} decode_args;

static inline float *cache_row(const decode_args *a, int64_t key_or_value, int64_t head,
                               int64_t block, int64_t offset) {
    return a->kv + (((key_or_value * a->heads + head) * a->num_blocks + block) * a->block_size
                    + offset) * a->head_dim;
}

/* Compiled into each ISA's variant below, where the compiler vectorizes it for that ISA. */
static inline __attribute__((always_inline)) void attend_one(const decode_args *a, int64_t seq,
                                                             int64_t head, float *scores) {
    const int64_t hd = a->head_dim, d_model = a->heads * hd, bs = a->block_size;
    const int64_t *table = a->blocks + seq * a->width;
    const int64_t p = a->pos[seq], length = p + 1;
    const float *q = a->qkv + seq * a->qkv_stride + head * hd;
    const float *k_new = q + d_model, *v_new = q + 2 * d_model;

    float *k_dst = cache_row(a, 0, head, table[p / bs], p % bs);
    float *v_dst = cache_row(a, 1, head, table[p / bs], p % bs);
    for (int64_t d = 0; d < hd; ++d) {
        k_dst[d] = k_new[d];
        v_dst[d] = v_new[d];
    }

    float max_score = -INFINITY;
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        const float *k = cache_row(a, 0, head, table[j0 / bs], 0);
        const int64_t count = length - j0 < bs ? length - j0 : bs;
        for (int64_t t = 0; t < count; ++t, k += hd) {
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < hd; ++d) s += q[d] * k[d];
            s *= a->scale;
            scores[j0 + t] = s;
            max_score = s > max_score ? s : max_score;
        }
    }
    float total = 0.f;
    for (int64_t j = 0; j < length; ++j) {
        scores[j] = expf(scores[j] - max_score);
        total += scores[j];
    }
    float *o = a->out + seq * d_model + head * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] = 0.f;
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        const float *v = cache_row(a, 1, head, table[j0 / bs], 0);
        const int64_t count = length - j0 < bs ? length - j0 : bs;
        for (int64_t t = 0; t < count; ++t, v += hd) {
            const float w = scores[j0 + t] / total;
#pragma omp simd
            for (int64_t d = 0; d < hd; ++d) o[d] += w * v[d];
        }
    }
}

static void attend_baseline(const decode_args *a, int64_t seq, int64_t head, float *scores) {
    attend_one(a, seq, head, scores);
}
#if X86
TARGET_AVX2 static void attend_avx2(const decode_args *a, int64_t seq, int64_t head,
                                    float *scores) {
    attend_one(a, seq, head, scores);
}
TARGET_AVX512 static void attend_avx512(const decode_args *a, int64_t seq, int64_t head,
                                        float *scores) {
    attend_one(a, seq, head, scores);
}
#endif

/* isa: 2 AVX-512, 1 AVX2 + FMA, 0 baseline (anything else: baseline) */
static int decode_attention_run(const decode_args *a, int isa) {
    void (*attend)(const decode_args *, int64_t, int64_t, float *) = attend_baseline;
#if X86
    if (isa == 2) attend = attend_avx512;
    if (isa == 1) attend = attend_avx2;
#endif
    int64_t longest = 0;
    for (int64_t i = 0; i < a->n; ++i) longest = a->pos[i] + 1 > longest ? a->pos[i] + 1 : longest;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (size_t)longest);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < a->n * a->heads; ++item)
            if (scores != NULL) attend(a, item / a->heads, item % a->heads, scores);
        free(scores);
    }
    return failed;
}

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long qkv, kv, blocks, pos, out;
    decode_args a;
    double scale;
    int isa;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLLdi", &qkv, &kv, &blocks, &pos, &out, &a.n,
                          &a.heads, &a.head_dim, &a.num_blocks, &a.block_size, &a.width,
                          &a.qkv_stride, &scale, &isa))
        return NULL;
    a.qkv = (const float *)(uintptr_t)qkv;
    a.kv = (float *)(uintptr_t)kv;
    a.blocks = (const int64_t *)(uintptr_t)blocks;
    a.pos = (const int64_t *)(uintptr_t)pos;
    a.out = (float *)(uintptr_t)out;
    a.scale = (float)scale;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_attention_run(&a, isa);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- int8 matmul: y = x @ W^T * scales + bias, x fp32 [m, k], W int8 [n, k] ----------------

Each row of x is quantized to u8 with its own scale and zero point (asymmetric, the range
stretched to hold 0), then multiplied by the int8 weights in int32: vpdpbusd where the CPU
has AVX-512 VNNI, else vpmaddubsw + vpmaddwd, whose int16 pair sums cannot saturate because
such weights hold 7 bits (quantize.py). W comes in kernels.pack_int8's layout: rows padded with
zeros to a multiple of 32 bytes and of four rows, each group of four interleaved 32 bytes at a
time. Threads split the groups, so each streams its share of W once for all of x's rows (up to
kernels.INT8_MAX_ROWS, the decode batch sizes this serves; beyond that fbgemm's GEMM is
faster). Sums stay within int32: 255 * 127 * k for k up to 66,000. */

typedef struct {
    const uint8_t *xq;      /* [m, k_padded] */
    const float *x_scale;   /* [m] */
    const int32_t *x_zero;  /* [m] */
    const int8_t *w;        /* [n4 / 4, k_padded / 32, 4, 32] (kernels.pack_int8) */
    const float *w_scale;   /* [n4] */
    const int32_t *w_sum;   /* [n4] sum of each weight row */
    const float *bias;      /* [n] or NULL */
    float *y;               /* [m, n] */
    int64_t m, n, k_padded;
} int8_args;

#if X86
#include <immintrin.h>

static inline int32_t hsum_epi32(__m256i v) __attribute__((target("avx2")));
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline void finish(const int8_args *a, int64_t row, int64_t o, int32_t dot) {
    float v = (float)(dot - a->x_zero[row] * a->w_sum[o]) * a->x_scale[row] * a->w_scale[o];
    a->y[row * a->n + o] = a->bias ? v + a->bias[o] : v;
}

/* Four weight rows by two x rows at a time: 8 accumulators, 4 weight and 2 x registers. */
#define INT8_BODY(DOT)                                                                        \
    const int64_t kp = a->k_padded;                                                          \
    for (int64_t o = o0; o < o1; o += 4) {                                                   \
        const int64_t rows = a->n - o < 4 ? a->n - o : 4;                                    \
        const int8_t *w = a->w + o * kp; /* four rows, interleaved by 32 bytes */            \
        for (int64_t b = 0; b < a->m; b += 2) {                                              \
            const uint8_t *x0 = a->xq + b * kp, *x1 = a->xq + (b + 1 < a->m ? b + 1 : b) * kp; \
            __m256i acc[2][4];                                                                \
            for (int r = 0; r < 4; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_si256();      \
            for (int64_t i = 0; i < kp; i += 32) {                                           \
                const __m256i xa = _mm256_loadu_si256((const __m256i *)(x0 + i));            \
                const __m256i xb = _mm256_loadu_si256((const __m256i *)(x1 + i));            \
                for (int r = 0; r < 4; ++r) {                                                 \
                    const __m256i wr = _mm256_loadu_si256((const __m256i *)(w + 4 * i + 32 * r)); \
                    acc[0][r] = DOT(acc[0][r], xa, wr);                                       \
                    acc[1][r] = DOT(acc[1][r], xb, wr);                                       \
                }                                                                             \
            }                                                                                 \
            for (int r = 0; r < rows; ++r) {                                                  \
                finish(a, b, o + r, hsum_epi32(acc[0][r]));                                   \
                if (b + 1 < a->m) finish(a, b + 1, o + r, hsum_epi32(acc[1][r]));            \
            }                                                                                 \
        }                                                                                     \
    }

__attribute__((target("avx2,fma"))) static inline __m256i dot_avx2(__m256i acc, __m256i x,
                                                                     __m256i w) {
    const __m256i pairs = _mm256_maddubs_epi16(x, w);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

__attribute__((target("avx512vnni,avx512vl,avx2"))) static inline __m256i dot_vnni(
    __m256i acc, __m256i x, __m256i w) {
    return _mm256_dpbusd_epi32(acc, x, w);
}

__attribute__((target("avx2,fma"))) static void int8_rows_avx2(const int8_args *a, int64_t o0,
                                                              int64_t o1) {
    INT8_BODY(dot_avx2)
}

__attribute__((target("avx512vnni,avx512vl,avx2,fma"))) static void int8_rows_vnni(
    const int8_args *a, int64_t o0, int64_t o1) {
    INT8_BODY(dot_vnni)
}
#define HAVE_INT8 1
#else
#define HAVE_INT8 0
#endif

/* Row b of x [m, k] -> u8 [k_padded] (zeros past k), its scale and zero point; and where
`error` is not NULL, the Euclidean norm of x minus what the u8 values stand for,
scale * (q - zero), summed in double (packing.HeadScreen bounds its logits with it). */
static void quantize_row(const float *x, int64_t k, int64_t k_padded, uint8_t *q,
                         float *scale, int32_t *zero, float *error) {
    float lo = 0.f, hi = 0.f;
    for (int64_t i = 0; i < k; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float s = hi > lo ? (hi - lo) / 255.f : 1.f;
    const int32_t z = (int32_t)nearbyintf(-lo / s);
    const float inv = 1.f / s;
    for (int64_t i = 0; i < k; ++i) {
        const float v = nearbyintf(x[i] * inv) + (float)z;
        q[i] = (uint8_t)(v < 0.f ? 0.f : v > 255.f ? 255.f : v);
    }
    for (int64_t i = k; i < k_padded; ++i) q[i] = 0;
    *scale = s;
    *zero = z;
    if (error) {
        double squares = 0.;
        for (int64_t i = 0; i < k; ++i) {
            const double d = (double)x[i] - (double)s * ((double)q[i] - (double)z);
            squares += d * d;
        }
        *error = (float)sqrt(squares);
    }
}

static PyObject *int8_linear(PyObject *self, PyObject *args) {
    unsigned long long x, w, w_scale, w_sum, bias, y, x_error;
    int64_t k;
    int8_args a;
    int vnni;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLpK", &x, &w, &w_scale, &w_sum, &bias, &y, &a.m,
                          &k, &a.n, &a.k_padded, &vnni, &x_error))
        return NULL;
#if HAVE_INT8
    a.w = (const int8_t *)(uintptr_t)w;
    a.w_scale = (const float *)(uintptr_t)w_scale;
    a.w_sum = (const int32_t *)(uintptr_t)w_sum;
    a.bias = (const float *)(uintptr_t)bias;
    a.y = (float *)(uintptr_t)y;
    uint8_t *xq = malloc((size_t)(a.m * a.k_padded));
    float *x_scale = malloc(sizeof(float) * (size_t)a.m);
    int32_t *x_zero = malloc(sizeof(int32_t) * (size_t)a.m);
    if (!xq || !x_scale || !x_zero) {
        free(xq), free(x_scale), free(x_zero);
        return PyErr_NoMemory();
    }
    a.xq = xq, a.x_scale = x_scale, a.x_zero = x_zero;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t b = 0; b < a.m; ++b)
        quantize_row((const float *)(uintptr_t)x + b * k, k, a.k_padded, xq + b * a.k_padded,
                     x_scale + b, x_zero + b,
                     x_error ? (float *)(uintptr_t)x_error + b : NULL);
#pragma omp parallel
    {
        /* whole groups of four rows per thread */
        const int64_t groups = (a.n + 3) / 4;
        const int threads = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t g0 = groups * t / threads, g1 = groups * (t + 1) / threads;
        const int64_t o0 = g0 * 4, o1 = g1 * 4 < a.n ? g1 * 4 : a.n;
        if (o0 < o1) {
            if (vnni)
                int8_rows_vnni(&a, o0, o1);
            else
                int8_rows_avx2(&a, o0, o1);
        }
    }
    Py_END_ALLOW_THREADS
    free(xq), free(x_scale), free(x_zero);
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "int8_linear needs an x86-64 build");
    return NULL;
#endif
}

/* ---- fp32 linear: y = x @ W + bias, x [m, k], W [k, n] ------------------------------------

W comes as kernels.pack_f32 lays it out: panels of 16 outputs, [ceil(n / 16), k, 16], each
panel the 16 weights of one input after another (zeros past n). Threads split the panels, so
each reads one sequential stream of W, once for all of x's rows (f32_panels says in what
order). A tile is R rows x 16 outputs summed in R x 16 registers over the k inputs: R up to 8
with AVX-512 (one zmm a row); with AVX2 (two ymm a row) 4 for a decode step's few rows and 6
for more (12 of the 16 registers; 4-row tiles left prompts behind oneDNN), so that the FMAs of a tile hide each other's latency without spilling. The tile is plain C
that the compiler vectorizes for each target; it ran as fast as intrinsics written out. Around
the product, optionally: the rows' LayerNorm before it, GELU and a residual add after it
(packing.FusedBlock). Or some of W's panels only, named in a list: output panel p is then W's
panel panels[p] (packing.HeadScreen's candidates). bench/kernels.py measures it against
oneDNN. */

typedef struct {
    const float *x;        /* [m, k]: the input, or its rows layer-normed (below) */
    const float *w;        /* [panels, k, 16] */
    const int64_t *panels; /* [n / 16]: the panels of W to multiply, or NULL for all */
    const float *bias;     /* [n] or NULL */
    const float *residual; /* [m, n] added to the output, or NULL */
    float *y;              /* [m, n] */
    int64_t m, k, n;
    int gelu;              /* the output through GELU's tanh form (before the residual) */
} f32_args;

/* GELU, tanh form (GPT-2's gelu_new), on 16 values. tanh as Eigen's rational approximation
(a few ulp in fp32; the libm call does not vectorize and cost more than the matmul's row). */
static inline __attribute__((always_inline)) void gelu_tanh16(float *v) {
#pragma omp simd
    for (int j = 0; j < 16; ++j) {
        float u = 0.7978845608f * (v[j] + 0.044715f * v[j] * v[j] * v[j]);
        u = u < -7.90531110763549805f ? -7.90531110763549805f : u;
        u = u > 7.90531110763549805f ? 7.90531110763549805f : u;
        const float u2 = u * u;
        float p = u2 * -2.76076847742355e-16f + 2.00018790482477e-13f;
        p = u2 * p + -8.60467152213735e-11f;
        p = u2 * p + 5.12229709037114e-08f;
        p = u2 * p + 1.48572235717979e-05f;
        p = u2 * p + 6.37261928875436e-04f;
        p = u2 * p + 4.89352455891786e-03f;
        p = u * p;
        float q = u2 * 1.19825839466702e-06f + 1.18534705686654e-04f;
        q = u2 * q + 2.26843463243900e-03f;
        q = u2 * q + 4.89352518554385e-03f;
        v[j] = 0.5f * v[j] * (1.f + p / q);
    }
}

/* LayerNorm of one row of k values (mean and variance summed in double). */
static void layer_norm_row(const float *x, int64_t k, const float *weight, const float *bias,
                           float eps, float *out) {
    double sum = 0., squares = 0.;
    for (int64_t i = 0; i < k; ++i) sum += x[i];
    const double mean = sum / (double)k;
    for (int64_t i = 0; i < k; ++i) squares += (x[i] - mean) * (x[i] - mean);
    const float m = (float)mean, rstd = (float)(1. / sqrt(squares / (double)k + eps));
    for (int64_t i = 0; i < k; ++i) out[i] = (x[i] - m) * rstd * weight[i] + bias[i];
}

#define F32_GROUP_BYTES (256 * 1024)
#define F32_FEW_ROWS 16
#define F32_L1_PREFETCH_ROWS 2

/* Where the next panel is prefetched to. A product of one or two rows does one or two FMAs a
cache line, too few to hide an L2 hit on each line, so they prefetch into L1. With more rows,
L1 holds the rows of x that every panel reuses, and prefetching into it slowed the product:
those prefetch into L2 (docs/benchmarks.md, "Why it is fast", compares the two). */
static inline __attribute__((always_inline)) void prefetch_panel(const char *line, int to_l1) {
    if (to_l1)
        __builtin_prefetch(line, 0, 3);
    else
        __builtin_prefetch(line, 0, 2);
}

/* rows x 16 outputs of one panel, summed over the k inputs; `rows` a constant where inlined,
so that acc stays in registers. Each input also prefetches the line at next + i * next_step:
a share of the panel read after this one (f32_panels). */
static inline __attribute__((always_inline)) void f32_tile(const f32_args *a, int64_t row,
                                                           const int rows, int64_t panel,
                                                           const char *next, int64_t next_step) {
    const int64_t k = a->k;
    const int to_l1 = a->m <= F32_L1_PREFETCH_ROWS;
    const float *restrict x = a->x + row * k;
    const float *restrict w = a->w + (a->panels ? a->panels[panel] : panel) * k * 16;
    float acc[8][16];
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < 16; ++j) acc[r][j] = 0.f;
    int64_t i = 0;
    if (rows == 1) {
        /* one row: two sums over alternate inputs, so that each FMA does not wait for the
        one before it (a single chain of FMA latencies streamed more slowly) */
        float odd[16];
        for (int j = 0; j < 16; ++j) odd[j] = 0.f;
        for (; i + 2 <= k; i += 2, w += 32) {
            prefetch_panel(next + i * next_step, to_l1);
            prefetch_panel(next + (i + 1) * next_step, to_l1);
            const float x0 = x[i], x1 = x[i + 1];
#pragma omp simd
            for (int j = 0; j < 16; ++j) {
                acc[0][j] += x0 * w[j];
                odd[j] += x1 * w[16 + j];
            }
        }
        for (int j = 0; j < 16; ++j) acc[0][j] += odd[j];
    }
    for (; i < k; ++i, w += 16) {
        prefetch_panel(next + i * next_step, to_l1);
        for (int r = 0; r < rows; ++r) {
            const float xi = x[r * k + i];
#pragma omp simd
            for (int j = 0; j < 16; ++j) acc[r][j] += xi * w[j];
        }
    }
    const int64_t col = panel * 16, cols = a->n - col < 16 ? a->n - col : 16;
    for (int r = 0; r < rows; ++r) {
        if (a->bias)
            for (int64_t j = 0; j < cols; ++j) acc[r][j] += a->bias[col + j];
        if (a->gelu) gelu_tanh16(acc[r]);
        float *y = a->y + (row + r) * a->n + col;
        if (a->residual) {
            const float *res = a->residual + (row + r) * a->n + col;
            for (int64_t j = 0; j < cols; ++j) y[j] = acc[r][j] + res[j];
        } else {
            for (int64_t j = 0; j < cols; ++j) y[j] = acc[r][j];
        }
    }
}

/* Panels p0..p1 for every row; ROWS the tile height of the target.
A decode step's few rows (up to F32_FEW_ROWS) take each panel through all their tiles while it
sits in L1/L2, and each tile prefetches its share of the next panel, so that memory streams
evenly through every tile (prefetching it all in the first tile left memory idle during the
others, and AVX2 at 8 rows ran far slower than at 1). More rows go through panels in groups
that fit F32_GROUP_BYTES (in L2), each group through every tile: W is still read from memory
once, and x's rows come from the caches once per group. */
#define F32_PANELS(NAME, TARGET, ROWS)                                                        \
    TARGET static void NAME(const f32_args *a, int64_t p0, int64_t p1) {                       \
        const int64_t k = a->k, few = a->m <= F32_FEW_ROWS;                                    \
        const int64_t tile_rows = ROWS, tiles = (a->m + ROWS - 1) / ROWS;                      \
        const int64_t next_step = few ? 64 / tiles : 64;                                       \
        int64_t group = few ? 1 : F32_GROUP_BYTES / (k * 16 * 4);                               \
        group = group < 1 ? 1 : group;                                                         \
        for (int64_t g0 = p0; g0 < p1; g0 += group) {                                          \
            const int64_t g1 = g0 + group < p1 ? g0 + group : p1;                              \
            for (int64_t r = 0; r < a->m; r += ROWS)                                           \
                for (int64_t p = g0; p < g1; ++p) {                                            \
                    const int64_t after = !a->panels ? p + 1                                   \
                                          : a->panels[p + 1 < p1 ? p + 1 : p];                 \
                    const char *next = (const char *)(a->w + after * k * 16)                   \
                                       + (few ? r / tile_rows * k * next_step : 0);            \
                    switch (a->m - r < ROWS ? a->m - r : ROWS) {                               \
                    case 1: f32_tile(a, r, 1, p, next, next_step); break;                      \
                    case 2: f32_tile(a, r, 2, p, next, next_step); break;                      \
                    case 3: f32_tile(a, r, 3, p, next, next_step); break;                      \
                    case 4: f32_tile(a, r, 4, p, next, next_step); break;                      \
                    case 5: f32_tile(a, r, 5, p, next, next_step); break;                      \
                    case 6: f32_tile(a, r, 6, p, next, next_step); break;                      \
                    case 7: f32_tile(a, r, 7, p, next, next_step); break;                      \
                    default: f32_tile(a, r, 8, p, next, next_step);                            \
                    }                                                                          \
                }                                                                              \
        }                                                                                      \
    }

#if X86
F32_PANELS(f32_panels_avx512, TARGET_AVX512, 8)
F32_PANELS(f32_panels_avx2, TARGET_AVX2, 4)
F32_PANELS(f32_panels_avx2_6, TARGET_AVX2, 6)
#endif

static PyObject *linear_f32(PyObject *self, PyObject *args) {
    unsigned long long x, w, bias, y, ln_weight, ln_bias, normed, residual, panels;
    double ln_eps;
    f32_args a;
    int isa;
    if (!PyArg_ParseTuple(args, "KKKKLLLiKKdKKpK", &x, &w, &bias, &y, &a.m, &a.k, &a.n, &isa,
                          &ln_weight, &ln_bias, &ln_eps, &normed, &residual, &a.gelu, &panels))
        return NULL;
#if X86
    if (isa == 1 || isa == 2) {
        const float *input = (const float *)(uintptr_t)x;
        a.x = ln_weight ? (const float *)(uintptr_t)normed : input;
        a.w = (const float *)(uintptr_t)w;
        a.panels = (const int64_t *)(uintptr_t)panels;
        a.bias = (const float *)(uintptr_t)bias;
        a.residual = (const float *)(uintptr_t)residual;
        a.y = (float *)(uintptr_t)y;
        Py_BEGIN_ALLOW_THREADS
#pragma omp parallel
        {
            if (ln_weight) {
#pragma omp for schedule(static)
                for (int64_t r = 0; r < a.m; ++r)
                    layer_norm_row(input + r * a.k, a.k, (const float *)(uintptr_t)ln_weight,
                                   (const float *)(uintptr_t)ln_bias, (float)ln_eps,
                                   (float *)(uintptr_t)normed + r * a.k);
            } /* (the loop's end is a barrier: every row normed before any panel) */
            const int64_t panels = (a.n + 15) / 16;
            const int threads = omp_get_num_threads(), t = omp_get_thread_num();
            const int64_t p0 = panels * t / threads, p1 = panels * (t + 1) / threads;
            if (isa == 2)
                f32_panels_avx512(&a, p0, p1);
            else if (a.m > F32_FEW_ROWS)
                f32_panels_avx2_6(&a, p0, p1);
            else
                f32_panels_avx2(&a, p0, p1);
        }
        Py_END_ALLOW_THREADS
        Py_RETURN_NONE;
    }
#endif
    PyErr_SetString(PyExc_RuntimeError, "linear_f32 needs AVX2 or AVX-512 (isa 1 or 2)");
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(qkv, kv, blocks, pos, out, n, heads, head_dim, num_blocks, block_size, "
     "width, qkv_stride, scale, isa): addresses of contiguous fp32/int64 tensors; isa 2 "
     "AVX-512, 1 AVX2, 0 baseline (kernels.py)"},
    {"int8_linear", int8_linear, METH_VARARGS,
     "int8_linear(x, w, w_scale, w_sum, bias, y, m, k, n, k_padded, vnni, x_error): "
     "addresses of contiguous tensors, 0 for none (kernels.py)"},
    {"linear_f32", linear_f32, METH_VARARGS,
     "linear_f32(x, w, bias, y, m, k, n, isa, ln_weight, ln_bias, ln_eps, normed, residual, "
     "gelu, panels): addresses of contiguous fp32 tensors, 0 for none; isa 2 AVX-512, 1 AVX2 "
     "(kernels.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
