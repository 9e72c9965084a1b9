/*
 * pearl_edu._kernels: SLERP's elementwise passes, fused, in plain C.
 *
 * torch runs `w0 * a + w1 * b` as six passes over memory (two casts, two products, a sum,
 * a cast back), the normalized products behind SLERP's angle, (a / |a|) * (b / |b|), as
 * five, and the cast to float32 before each norm on its whole team of threads. These loops
 * do the same arithmetic in one pass each, reading the bfloat16 (or float32) inputs
 * directly.
 *
 * Same bits as torch, by construction:
 * - every operation is one IEEE float32 operation, rounded on its own: the file is
 *   compiled with -ffp-contract=off (and says so below for compilers that read the
 *   pragma), so no product and sum are fused into one multiply-add;
 * - bfloat16 -> float32 is exact (the 16 bits become the high half);
 * - float32 -> bfloat16 rounds to nearest, ties to even, as torch does, and a NaN
 *   becomes the NaN torch's vectorized cast writes (0xFFFF);
 * - the sums behind norms and dot products are not here: their order decides their
 *   last bits, so they stay with torch (see pearl_edu.backends.cpu.cosine).
 *
 * The tests compare every function with torch's arithmetic bit for bit, special values
 * included. pearl_edu loads this library with ctypes (it has no Python API of its own)
 * and falls back to torch when it is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <stdint.h>
#include <string.h>

#pragma STDC FP_CONTRACT OFF

/* float arithmetic carried out in a wider format (x87) would round twice: no build, then,
   and pearl_edu uses torch's loops instead. */
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "pearl_edu._kernels needs float arithmetic evaluated in float (FLT_EVAL_METHOD 0)"
#endif

/* On x86-64 with GCC or clang, each loop is built twice, for AVX2 and for the baseline,
   and the loader picks the one the CPU runs (bandwidth-bound loops gain about 2x). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__APPLE__) && defined(__ELF__)
#define PEARL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PEARL_CLONES
#endif

#if defined(_WIN32)
#define PEARL_API __declspec(dllexport)
#else
#define PEARL_API __attribute__((visibility("default")))
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0xFFFFu;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The version of this interface; pearl_edu refuses a library of another. */
PEARL_API int pearl_kernels_version(void) { return 2; }

/* ---- the loops: each handles elements [start, stop) ---- */

struct pair_args {
    const void *a, *b;
    void *out;
    float s0, s1; /* weights, or norms */
};

/* The two loops that read a pair of inputs, for one input dtype: `load` widens an element
   to float32 and `store` writes a float32 result in the input's dtype. */
#define PAIR_LOOPS(dtype, elem, load, store)                                                  \
    PEARL_CLONES static void weighted_sum_##dtype(const struct pair_args *p, int64_t start,  \
                                                  int64_t stop) {                             \
        const elem *a = p->a, *b = p->b;                                                      \
        elem *out = p->out;                                                                   \
        const float w0 = p->s0, w1 = p->s1;                                                   \
        for (int64_t i = start; i < stop; i++) {                                              \
            float x = load(a[i]) * w0;                                                        \
            float y = load(b[i]) * w1;                                                        \
            out[i] = store(x + y);                                                            \
        }                                                                                     \
    }                                                                                         \
                                                                                              \
    PEARL_CLONES static void normalized_products_##dtype(const struct pair_args *p,           \
                                                         int64_t start, int64_t stop) {       \
        const elem *a = p->a, *b = p->b;                                                      \
        float *out = p->out;                                                                  \
        const float norm_a = p->s0, norm_b = p->s1;                                           \
        for (int64_t i = start; i < stop; i++) {                                              \
            float x = load(a[i]) / norm_a;                                                    \
            float y = load(b[i]) / norm_b;                                                    \
            out[i] = x * y;                                                                   \
        }                                                                                     \
    }

static inline float f32_as_is(float f) { return f; }

PAIR_LOOPS(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
PAIR_LOOPS(f32, float, f32_as_is, f32_as_is)

PEARL_CLONES static void widen_bf16(const struct pair_args *p, int64_t start, int64_t stop) {
    const uint16_t *a = p->a;
    float *out = p->out;
    for (int64_t i = start; i < stop; i++) out[i] = bf16_to_f32(a[i]);
}

/* ---- splitting a loop between threads: elementwise, so any split gives the same bits ---- */

typedef void (*range_fn)(const struct pair_args *, int64_t, int64_t);

#define MAX_THREADS 256
#define MIN_PER_THREAD ((int64_t)1 << 17) /* below this, a thread costs more than it saves */

#if defined(_WIN32)
static void run(range_fn fn, const struct pair_args *args, int64_t n, int threads) {
    (void)threads;
    fn(args, 0, n);
}
#else
#include <pthread.h>

struct slice {
    range_fn fn;
    const struct pair_args *args;
    int64_t start, stop;
};

static void *run_slice(void *p) {
    const struct slice *s = p;
    s->fn(s->args, s->start, s->stop);
    return NULL;
}

/* fn over [0, n) on up to `threads` threads, the calling one included, in slices of
   whole cache lines. A thread that cannot be started leaves its slice to the caller. */
static void run(range_fn fn, const struct pair_args *args, int64_t n, int threads) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((int64_t)threads > n / MIN_PER_THREAD) threads = (int)(n / MIN_PER_THREAD);
    if (threads <= 1) {
        fn(args, 0, n);
        return;
    }
    int64_t step = ((n + threads - 1) / threads + 63) & ~(int64_t)63;
    struct slice slices[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        int64_t start = t * step, stop = start + step;
        slices[t] = (struct slice){fn, args, start < n ? start : n, stop < n ? stop : n};
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_slice, &slices[t]) == 0;
    run_slice(&slices[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run_slice(&slices[t]);
    }
}
#endif

/* ---- the interface: raw pointers, a count, two float32 scalars, a number of threads ---- */

/* out[i] = w0 * a[i] + w1 * b[i], each product and the sum rounded to float32. */
PEARL_API void pearl_weighted_sum_bf16(const uint16_t *a, const uint16_t *b, uint16_t *out,
                                       int64_t n, float w0, float w1, int threads) {
    struct pair_args args = {a, b, out, w0, w1};
    run(weighted_sum_bf16, &args, n, threads);
}

PEARL_API void pearl_weighted_sum_f32(const float *a, const float *b, float *out, int64_t n,
                                      float w0, float w1, int threads) {
    struct pair_args args = {a, b, out, w0, w1};
    run(weighted_sum_f32, &args, n, threads);
}

/* out[i] = (a[i] / norm_a) * (b[i] / norm_b): the terms of the cosine's dot product. */
PEARL_API void pearl_normalized_products_bf16(const uint16_t *a, const uint16_t *b, float *out,
                                              int64_t n, float norm_a, float norm_b,
                                              int threads) {
    struct pair_args args = {a, b, out, norm_a, norm_b};
    run(normalized_products_bf16, &args, n, threads);
}

PEARL_API void pearl_normalized_products_f32(const float *a, const float *b, float *out,
                                             int64_t n, float norm_a, float norm_b,
                                             int threads) {
    struct pair_args args = {a, b, out, norm_a, norm_b};
    run(normalized_products_f32, &args, n, threads);
}

/* out[i] = a[i], widened from bfloat16 to float32 (exact). */
PEARL_API void pearl_widen_bf16(const uint16_t *a, float *out, int64_t n, int threads) {
    struct pair_args args = {a, NULL, out, 0.0f, 0.0f};
    run(widen_bf16, &args, n, threads);
}

/* An importable, empty module, so that the library installs as an ordinary extension. */
static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "SLERP's elementwise passes in C; loaded with ctypes by pearl_edu.kernels.", -1, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
