/* CPU kernels that PyTorch has no single op for (see kernels.py, which calls them).

decode_attention: one decode step's attention for N sequences reading a paged KV cache
(model.KVCache) in place. Each sequence stores the key and value of its new token, then its
query attends to every position it has, block by block through its block table. Done with
torch ops this is a store, a gather of every block into one buffer, and scaled-dot-product
attention over the copy: three passes over the keys and values and a dozen small ops per
layer, which at batch 1 to 8 cost more than the arithmetic.

Plain C with OpenMP: the module links libgomp by soname, so once torch is imported it shares
torch's OpenMP runtime and thread count (torch.set_num_threads) instead of starting a second
team. Built by `pip install` (setup.py); gcc's target_clones compiles the loops for AVX-512,
AVX2+FMA and baseline x86-64 and picks one at load from CPUID.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
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

VECTOR_CLONES
static void attend_one(const decode_args *a, int64_t seq, int64_t head, float *scores) {
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

static int decode_attention_run(const decode_args *a) {
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
            if (scores != NULL) attend_one(a, item / a->heads, item % a->heads, scores);
        free(scores);
    }
    return failed;
}

static PyObject *decode_attention(PyObject *self, PyObject *args) {
    unsigned long long qkv, kv, blocks, pos, out;
    decode_args a;
    double scale;
    if (!PyArg_ParseTuple(args, "KKKKKLLLLLLLd", &qkv, &kv, &blocks, &pos, &out, &a.n,
                          &a.heads, &a.head_dim, &a.num_blocks, &a.block_size, &a.width,
                          &a.qkv_stride, &scale))
        return NULL;
    a.qkv = (const float *)(uintptr_t)qkv;
    a.kv = (float *)(uintptr_t)kv;
    a.blocks = (const int64_t *)(uintptr_t)blocks;
    a.pos = (const int64_t *)(uintptr_t)pos;
    a.out = (float *)(uintptr_t)out;
    a.scale = (float)scale;
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_attention_run(&a);
    Py_END_ALLOW_THREADS
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", decode_attention, METH_VARARGS,
     "decode_attention(qkv, kv, blocks, pos, out, n, heads, head_dim, num_blocks, block_size, "
     "width, qkv_stride, scale): addresses of contiguous fp32/int64 tensors (kernels.py)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
