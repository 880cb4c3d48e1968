/* The cores' own arithmetic peak, in registers: no memory, no library, nothing to lose time to.
 *
 *     cc -O2 -fopenmp benchmarks/cpu_peak.c -o cpu_peak && ./cpu_peak
 *
 * kernel_floor.py --roofline builds and runs it. Every thread of the OpenMP team runs 12
 * independent accumulator chains of one instruction (enough to cover its latency on the pipes)
 * for a fixed count, best of 3: AVX-512 BF16 dot products (VDPBF16PS: 32 bf16 pairs, 64 FLOP)
 * where the CPU has them, and fp32 fused multiply-adds (AVX-512, else AVX2). No matrix product,
 * attention or decoder step can run faster than this; a GEMM that reaches 90 % of it is about as
 * good as CPU kernels get. Prints one line per kind: "<kind> <GFLOP/s> <threads>".
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#define ITERS 100000000L
#define CHAINS 12
/* the 12 chains written out: a loop over an array of them may keep them in memory */
#define TWELVE(OP) OP(0) OP(1) OP(2) OP(3) OP(4) OP(5) OP(6) OP(7) OP(8) OP(9) OP(10) OP(11)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx512f,avx512bf16"))) static float bf16_chains(void) {
    __m512 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
    for (long it = 0; it < ITERS; it++) {
#define DOT(i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
        TWELVE(DOT)
        __asm__ volatile("" : "+v"(a)); /* keep the loop from being folded */
    }
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

__attribute__((target("avx512f"))) static float fp32_chains_512(void) {
    __m512 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_setzero_ps();
    __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
    for (long it = 0; it < ITERS; it++) {
#define FMA512(i) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
        TWELVE(FMA512)
        __asm__ volatile("" : "+v"(a));
    }
    float s = 0;
    for (int i = 0; i < CHAINS; i++) s += _mm512_reduce_add_ps(acc[i]);
    return s;
}

__attribute__((target("avx2,fma"))) static float fp32_chains_256(void) {
    __m256 acc[CHAINS];
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_setzero_ps();
    __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
    for (long it = 0; it < ITERS; it++) {
#define FMA256(i) acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
        TWELVE(FMA256)
        __asm__ volatile("" : "+x"(a));
    }
    float s = 0, lanes[8];
    for (int i = 0; i < CHAINS; i++) {
        _mm256_storeu_ps(lanes, acc[i]);
        for (int j = 0; j < 8; j++) s += lanes[j];
    }
    return s;
}

/* Best of 3 team-wide rates of `chains` doing `flop_per_op` per instruction. */
static void report(const char *kind, float (*chains)(void), double flop_per_op) {
    double best = 0;
    int threads = omp_get_max_threads();
    volatile float sink = 0;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now();
        float s = 0;
#pragma omp parallel reduction(+ : s)
        s += chains();
        double rate = (double)ITERS * CHAINS * flop_per_op * threads / (now() - t0);
        sink += s;
        if (rate > best) best = rate;
    }
    printf("%s %.1f %d\n", kind, best / 1e9, threads);
}

int main(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512bf16")) report("bf16", bf16_chains, 64.0);
    if (__builtin_cpu_supports("avx512f"))
        report("fp32", fp32_chains_512, 32.0);
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        report("fp32", fp32_chains_256, 16.0);
    return 0;
}
