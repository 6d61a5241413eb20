/* Matmul kernels for quantized linear layers on AVX-512 CPUs (built and loaded by cpu_kernels.py).
 *
 * torch's CPU int4 kernel reads a decode step's weights at 15-19 GB/s on a machine whose memory
 * gives 50: it is bound by its own instructions, not by memory. These kernels read the weights
 * once, in the order they lie, and spend a few vector instructions per 64 bytes, so a decode
 * step's matmuls run near the memory's speed.
 *
 * Weights are laid out in tiles of 32 output rows (two blocks of 16, one vector lane per row),
 * walked along the inputs, so each thread reads one sequential stream.
 *
 * Plain C with intrinsics, no torch headers: the library builds in well under a second. The
 * kernels carry their own target attributes, so `ms_cpu_supported` can run on any x86-64 CPU.
 * Parallel loops use OpenMP: linked against the libgomp torch has already loaded, they share
 * torch's thread pool and thread count (`num_threads` is passed in, torch's own setting).
 */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KERNEL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,fma")))
#define INLINE static inline __attribute__((always_inline))
#define PREFETCH_AHEAD 1024 /* bytes: the hardware prefetcher ramps up too slowly on short streams */

int ms_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16")
        && __builtin_cpu_supports("fma");
}

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* ---- int4 weights, bfloat16 inputs ------------------------------------------------------------
 *
 * w: [N/32 tiles][K/4 quads][2 blocks][32 bytes]. In block b of tile t, byte j of quad p holds row
 * t*32 + b*16 + j/2: its low nibble is q[4p + j%2], its high nibble q[4p + 2 + j%2]. Widened to
 * 16 bits, OR-ed with 0x4300 (bfloat16 128.0), a nibble becomes the bfloat16 number 128 + q,
 * exactly; `vdpbf16ps` then multiplies pairs of those by pairs of inputs into float32 lanes, one
 * lane per row. The 128 comes back out per group through the offsets:
 * sz: [N/32][K/G groups][4][16] float32: scales of block 0, block 1, then offsets of block 0,
 * block 1, where weight = (128 + q) * scale + offset.
 */

/* rows b0.. of tile `t`, one input row, two independent accumulators per block (the dot product's
 * latency, not its throughput, bounds a single chain) */
KERNEL_TARGET INLINE void int4_tile_1row(const uint16_t *x, int64_t K, const uint8_t *wt, const float *szt,
                                         int64_t G, const float *xsum, uint16_t *y) {
    const __m512i nibble = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    const int64_t groups = K / G, quads_per_group = G / 4;
    __m512 out0 = _mm512_setzero_ps(), out1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 lo0 = _mm512_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        for (int64_t p = g * quads_per_group; p < (g + 1) * quads_per_group; p++) {
            const uint8_t *wp = wt + p * 64;
            _mm_prefetch((const char *)(wp + PREFETCH_AHEAD), _MM_HINT_T0);
            const int32_t *xp = (const int32_t *)(x + 4 * p);
            __m512bh x_lo = (__m512bh)_mm512_set1_epi32(xp[0]), x_hi = (__m512bh)_mm512_set1_epi32(xp[1]);
            __m512i v0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)wp));
            __m512i v1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wp + 32)));
            /* 0xEA: (a & b) | c */
            lo0 = _mm512_dpbf16_ps(lo0, (__m512bh)_mm512_ternarylogic_epi32(v0, nibble, bias, 0xEA), x_lo);
            hi0 = _mm512_dpbf16_ps(hi0, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v0, 4), nibble, bias, 0xEA), x_hi);
            lo1 = _mm512_dpbf16_ps(lo1, (__m512bh)_mm512_ternarylogic_epi32(v1, nibble, bias, 0xEA), x_lo);
            hi1 = _mm512_dpbf16_ps(hi1, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v1, 4), nibble, bias, 0xEA), x_hi);
        }
        const float *sz = szt + g * 64;
        __m512 group_sum = _mm512_set1_ps(xsum[g]);
        out0 = _mm512_fmadd_ps(_mm512_loadu_ps(sz), _mm512_add_ps(lo0, hi0), out0);
        out0 = _mm512_fmadd_ps(_mm512_loadu_ps(sz + 32), group_sum, out0);
        out1 = _mm512_fmadd_ps(_mm512_loadu_ps(sz + 16), _mm512_add_ps(lo1, hi1), out1);
        out1 = _mm512_fmadd_ps(_mm512_loadu_ps(sz + 48), group_sum, out1);
    }
    _mm256_storeu_si256((__m256i *)y, (__m256i)_mm512_cvtneps_pbh(out0));
    _mm256_storeu_si256((__m256i *)(y + 16), (__m256i)_mm512_cvtneps_pbh(out1));
}

/* the same for four input rows at once: each weight is unpacked once for four rows */
KERNEL_TARGET INLINE void int4_tile_4rows(const uint16_t *x, int64_t K, const uint8_t *wt, const float *szt,
                                          int64_t G, const float *xsum, uint16_t *y, int64_t N) {
    const __m512i nibble = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    const int64_t groups = K / G, quads_per_group = G / 4;
    __m512 out[2][4];
    for (int r = 0; r < 4; r++) out[0][r] = out[1][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 acc[2][4];
        for (int r = 0; r < 4; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
        for (int64_t p = g * quads_per_group; p < (g + 1) * quads_per_group; p++) {
            const uint8_t *wp = wt + p * 64;
            _mm_prefetch((const char *)(wp + PREFETCH_AHEAD), _MM_HINT_T0);
            for (int b = 0; b < 2; b++) {
                __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(wp + 32 * b)));
                __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(v, nibble, bias, 0xEA);
                __m512bh hi = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, bias, 0xEA);
                for (int r = 0; r < 4; r++) {
                    const int32_t *xp = (const int32_t *)(x + r * K + 4 * p);
                    acc[b][r] = _mm512_dpbf16_ps(acc[b][r], lo, (__m512bh)_mm512_set1_epi32(xp[0]));
                    acc[b][r] = _mm512_dpbf16_ps(acc[b][r], hi, (__m512bh)_mm512_set1_epi32(xp[1]));
                }
            }
        }
        const float *sz = szt + g * 64;
        for (int b = 0; b < 2; b++) {
            __m512 scale = _mm512_loadu_ps(sz + 16 * b), offset = _mm512_loadu_ps(sz + 32 + 16 * b);
            for (int r = 0; r < 4; r++) {
                out[b][r] = _mm512_fmadd_ps(scale, acc[b][r], out[b][r]);
                out[b][r] = _mm512_fmadd_ps(offset, _mm512_set1_ps(xsum[r * groups + g]), out[b][r]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < 2; b++)
            _mm256_storeu_si256((__m256i *)(y + r * N + 16 * b), (__m256i)_mm512_cvtneps_pbh(out[b][r]));
}

/* y (M, N) bfloat16 = x (M, K) bfloat16 @ dequantized(w)^T; K % G == 0, G % 4 == 0, N % 32 == 0.
 * Returns 0, or -1 when out of memory. */
KERNEL_TARGET int ms_int4_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *sz,
                                 int64_t N, int64_t G, uint16_t *y, int num_threads) {
    const int64_t groups = K / G, tiles = N / 32;
    float *xsum = malloc(sizeof(float) * M * groups); /* each group's input sum, for the offsets */
    if (xsum == NULL) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) sum += bf16_to_float(x[m * K + k]);
            xsum[m * groups + g] = sum;
        }
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; t++) {
        const uint8_t *wt = w + t * (K / 4) * 64;
        const float *szt = sz + t * groups * 64;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            int4_tile_4rows(x + m * K, K, wt, szt, G, xsum + m * groups, y + m * N + t * 32, N);
        for (; m < M; m++)
            int4_tile_1row(x + m * K, K, wt, szt, G, xsum + m * groups, y + m * N + t * 32);
    }
    free(xsum);
    return 0;
}
