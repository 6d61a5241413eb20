/* CPU kernels for AVX-512 machines with bfloat16 and int8 dot products (built when the package is
 * installed, see build.py; declared in kernels.h; bound by kernels.py): int4, int8 and bfloat16 matmuls, decode attention over the paged KV cache, the
 * small per-layer ops, and a whole decode step.
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
 * Parallel loops use OpenMP. The library needs libgomp.so.1, and torch's wheel ships a libgomp with
 * that soname which is loaded first (kernels.py imports torch), so the dynamic linker binds ours to
 * it: one OpenMP runtime, and the kernels, called from the thread that runs torch's ops, reuse that
 * thread's OpenMP team (`num_threads` is passed in, torch's own setting). kernels.py checks it.
 */

#include <cpuid.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kernels.h"

#define KERNEL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,fma")))
/* the kernels that may also run on the tile units (AMX); they use them only where ms_enable_amx
 * said they can */
#define AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,fma,amx-tile,amx-int8,amx-bf16")))
#define INLINE static inline __attribute__((always_inline))
/* loop iterations: the weights are prefetched this far ahead of the loop (the hardware prefetcher
 * ramps up too slowly on short streams; measured best of 8, 16, 24 and 32 for both kernels) */
#define PREFETCH_ITERATIONS 16

#ifndef MS_SOURCE_ID /* given by the build (build.py) */
#define MS_SOURCE_ID "unknown"
#endif

const char *ms_source_id(void) { return MS_SOURCE_ID; }

int64_t ms_struct_size(const char *name) {
    if (strcmp(name, "LinearWeights") == 0) return sizeof(LinearWeights);
    if (strcmp(name, "LayerWeights") == 0) return sizeof(LayerWeights);
    if (strcmp(name, "DecoderShape") == 0) return sizeof(DecoderShape);
    return -1;
}

int ms_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16")
        && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma");
}

static inline float bf16_to_float(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float result;
    memcpy(&result, &bits, sizeof result);
    return result;
}

/* sixteen bfloat16 numbers to float32, and back (rounded to nearest even, as torch rounds) */
KERNEL_TARGET INLINE __m512 bf16x16_to_float(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
KERNEL_TARGET INLINE __m256i round_to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }
KERNEL_TARGET INLINE void store_bf16x16(uint16_t *p, __m512 x) { _mm256_storeu_si256((__m256i *)p, round_to_bf16(x)); }
/* x rounded to bfloat16 and widened again: where torch keeps a bfloat16 intermediate */
KERNEL_TARGET INLINE __m512 bf16_round_trip(__m512 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_to_bf16(x)), 16));
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

/* a block's 32 bytes of one quad as bfloat16 numbers 128 + q: the low nibbles (inputs 4p, 4p + 1 of
 * each row) and the high ones (4p + 2, 4p + 3) */
KERNEL_TARGET INLINE void int4_block_as_bf16(const uint8_t *block, __m512bh *low, __m512bh *high) {
    const __m512i nibble = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)block));
    /* 0xEA: (a & b) | c */
    *low = (__m512bh)_mm512_ternarylogic_epi32(v, nibble, bias, 0xEA);
    *high = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nibble, bias, 0xEA);
}

/* one tile (32 rows) against one input row, two independent accumulators per block (the dot
 * product's latency, not its throughput, bounds a single chain) */
KERNEL_TARGET INLINE void int4_tile_1row(const uint16_t *x, int64_t K, const uint8_t *wt, const float *szt,
                                         int64_t G, const float *xsum, uint16_t *y) {
    const int64_t groups = K / G, quads_per_group = G / 4;
    __m512 out0 = _mm512_setzero_ps(), out1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 lo0 = _mm512_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
        for (int64_t p = g * quads_per_group; p < (g + 1) * quads_per_group; p++) {
            const uint8_t *wp = wt + p * 64;
            _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 64), _MM_HINT_T0);
            const int32_t *xp = (const int32_t *)(x + 4 * p);
            __m512bh x_lo = (__m512bh)_mm512_set1_epi32(xp[0]), x_hi = (__m512bh)_mm512_set1_epi32(xp[1]);
            __m512bh low0, high0, low1, high1;
            int4_block_as_bf16(wp, &low0, &high0);
            int4_block_as_bf16(wp + 32, &low1, &high1);
            lo0 = _mm512_dpbf16_ps(lo0, low0, x_lo);
            hi0 = _mm512_dpbf16_ps(hi0, high0, x_hi);
            lo1 = _mm512_dpbf16_ps(lo1, low1, x_lo);
            hi1 = _mm512_dpbf16_ps(hi1, high1, x_hi);
        }
        const float *sz = szt + g * 64;
        __m512 group_sum = _mm512_set1_ps(xsum[g]);
        out0 = _mm512_fmadd_ps(_mm512_loadu_ps(sz), _mm512_add_ps(lo0, hi0), out0);
        out0 = _mm512_fmadd_ps(_mm512_loadu_ps(sz + 32), group_sum, out0);
        out1 = _mm512_fmadd_ps(_mm512_loadu_ps(sz + 16), _mm512_add_ps(lo1, hi1), out1);
        out1 = _mm512_fmadd_ps(_mm512_loadu_ps(sz + 48), group_sum, out1);
    }
    store_bf16x16(y, out0);
    store_bf16x16(y + 16, out1);
}

/* the same for four input rows at once: each weight is unpacked once for four rows */
KERNEL_TARGET INLINE void int4_tile_4rows(const uint16_t *x, int64_t K, const uint8_t *wt, const float *szt,
                                          int64_t G, const float *xsum, uint16_t *y, int64_t N) {
    const int64_t groups = K / G, quads_per_group = G / 4;
    __m512 out[2][4];
    for (int r = 0; r < 4; r++) out[0][r] = out[1][r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 acc[2][4];
        for (int r = 0; r < 4; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
        for (int64_t p = g * quads_per_group; p < (g + 1) * quads_per_group; p++) {
            const uint8_t *wp = wt + p * 64;
            _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 64), _MM_HINT_T0);
            for (int b = 0; b < 2; b++) {
                __m512bh lo, hi;
                int4_block_as_bf16(wp + 32 * b, &lo, &hi);
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
            store_bf16x16(y + r * N + 16 * b, out[b][r]);
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

/* ---- the tile units (AMX), where the CPU has them ----------------------------------------------
 *
 * Intel's tile units multiply a 16x64-byte tile of inputs by a 16x64-byte tile of weights in one
 * instruction: for 8 rows and more they do a matmul's arithmetic many times faster than the vector
 * loops (prefill, and decode batches, which on one stream are bound by memory, not arithmetic).
 * Our int8 and bfloat16 layouts are already what they read: one block of one quad (int8) or pair
 * (bfloat16) is a tile row, 16 weight rows by 64 bytes, and the next quad's block lies 128 bytes
 * on, so a weight tile is 16 quads (64 inputs) or 16 pairs (32 inputs) of one block, loaded with
 * a stride of 128. Inputs are read 16 rows at a time; callers pad them to a multiple of 16 rows.
 * Tiles 0-3: the sums of (16-row half h, block b) at 2h + b; 4-5: the inputs of each half; 6-7:
 * the weights of each block.
 */

/* the row count from which the tile units run: one row (a single stream's decode) is bound by memory
 * either way; at 2 int8 rows they matched the vector loops, at 2 bfloat16 rows they read the
 * weights once where the vector loops read them once per row; from 8 rows on they were 2-5x faster */
#define AMX_MIN_ROWS 2
#define AMX_ROWS 16

static int amx_usable; /* set by ms_enable_amx */

/* Turns the tile units on (wanted != 0) where the CPU has them and Linux lets this process use
 * them, or off. Returns whether they are on. */
int ms_enable_amx(int wanted) {
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    const unsigned amx_bits = (1u << 22) | (1u << 24) | (1u << 25); /* amx-bf16, amx-tile, amx-int8 */
    unsigned eax, ebx, ecx, edx;
    amx_usable = wanted && __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & amx_bits) == amx_bits
        /* Linux gives a process the tiles' state (8 KB per thread) only when it asks */
        && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_usable;
}

/* the tile shapes, per thread: every tile 16 rows of 64 bytes */
AMX_TARGET static void configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes_per_row[16];
        uint8_t rows[16];
    } __attribute__((packed)) config = {.palette = 1};
    for (int tile = 0; tile < 8; tile++) {
        config.bytes_per_row[tile] = 64;
        config.rows[tile] = AMX_ROWS;
    }
    _tile_loadconfig(&config);
}

AMX_TARGET INLINE void zero_sum_tiles(void) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }

/* the sums of `halves` (1 or 2) x 16 rows into sums[32][32], four-byte numbers (int32 or float32) */
AMX_TARGET INLINE void store_sum_tiles(void *sums, int halves) {
    const int64_t row_bytes = 32 * 4;
    char *at = sums;
    _tile_stored(0, at, row_bytes);
    _tile_stored(1, at + 16 * 4, row_bytes);
    if (halves == 2) {
        _tile_stored(2, at + AMX_ROWS * row_bytes, row_bytes);
        _tile_stored(3, at + AMX_ROWS * row_bytes + 16 * 4, row_bytes);
    }
}

/* sums of `halves` (1 or 2) x 16 input rows of `row_bytes` against one weight tile (32 rows) into
 * sums[32][32]: unsigned int8 steps by int8 weights into int32, or bfloat16 inputs by bfloat16
 * weights into float32. In both layouts the weights for 64 bytes of input (16 quads, 16 pairs) are
 * the next 2048 bytes of the tile. */
AMX_TARGET INLINE void tile_sums_amx(const void *x, int64_t row_bytes, const void *wt, int halves, int is_bf16,
                                     void *sums) {
    const char *xb = x, *wb = wt;
    zero_sum_tiles();
    for (int64_t i = 0; i < row_bytes; i += 64) {
        _tile_loadd(6, wb + 32 * i, 128);
        _tile_loadd(7, wb + 32 * i + 64, 128);
        _tile_loadd(4, xb + i, row_bytes);
        if (halves == 2) _tile_loadd(5, xb + AMX_ROWS * row_bytes + i, row_bytes);
        if (is_bf16) {
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (halves == 2) { _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); }
        } else {
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            if (halves == 2) { _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7); }
        }
    }
    store_sum_tiles(sums, halves);
}

static inline int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

/* ---- int8 weights, int8 inputs ----------------------------------------------------------------
 *
 * Each input row is split into `passes` rows of int8 steps (as quant.py's _quantize_rows does): the
 * row in steps of its largest feature / 127, then what that missed in steps 254 times finer. The
 * steps go in as unsigned bytes (step + 128) to `vpdpbusd`, which multiplies four of them by four
 * signed int8 weights into each int32 lane: exact integer sums, from which 128 * (the row's weight
 * sum) is taken back out.
 *
 * w: [N/32 tiles][K/4 quads][2 blocks][64 bytes]: in block b of tile t, byte 4i + j of quad p is
 * row t*32 + b*16 + i, input 4p + j.
 */

#define INT8_ZERO_POINT 128
#define INT8_PASS_RATIO 254.f

/* one input row (bfloat16 or float32) into `passes` rows of unsigned steps (passes, K) and their
 * scales (passes,) */
static void quantize_row(const void *x, int is_float32, int64_t K, int passes, uint8_t *steps, float *scales) {
    const uint16_t *x_bf16 = x;
    const float *x_f32 = x;
    float absmax = 0.f;
    for (int64_t k = 0; k < K; k++) {
        float value = is_float32 ? x_f32[k] : bf16_to_float(x_bf16[k]);
        absmax = value > absmax ? value : (-value > absmax ? -value : absmax);
    }
    const float scale = (absmax > 1e-30f ? absmax : 1e-30f) / 127.f;
    float pass_scale = scale;
    for (int pass = 0; pass < passes; pass++, pass_scale /= INT8_PASS_RATIO) scales[pass] = pass_scale;
    for (int64_t k = 0; k < K; k++) {
        float remainder = (is_float32 ? x_f32[k] : bf16_to_float(x_bf16[k])) / scale; /* in [-127, 127] */
        for (int pass = 0; pass < passes; pass++) {
            float step = __builtin_rintf(remainder); /* half to even, as torch.round */
            steps[pass * K + k] = (uint8_t)((int)step + INT8_ZERO_POINT);
            remainder = (remainder - step) * INT8_PASS_RATIO;
        }
    }
}

/* int32 sums of `R` (1..4) unsigned step rows against one tile: sums[r][32] */
KERNEL_TARGET INLINE void int8_tile(const uint8_t *steps, int64_t K, const int8_t *wt, const int R, int32_t *sums) {
    __m512i acc[4][2];
    for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t p = 0; p < K / 4; p++) {
        const int8_t *wp = wt + p * 128;
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 128 + 64), _MM_HINT_T0);
        __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 64);
        for (int r = 0; r < R; r++) {
            int32_t quad;
            memcpy(&quad, steps + r * K + 4 * p, sizeof quad);
            __m512i x = _mm512_set1_epi32(quad);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], x, w0);
            acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], x, w1);
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_si512(sums + r * 32, acc[r][0]);
        _mm512_storeu_si512(sums + r * 32 + 16, acc[r][1]);
    }
}

/* y (M, N) = x (M, K) @ (w * w_scales)^T, x in `passes` int8 passes (1 or 2); x and y bfloat16, or
 * float32 where is_float32 says so; w_sums: each row's sum of weights. K % 4 == 0, N % 32 == 0.
 * Returns 0, or -1 out of memory. */
AMX_TARGET int ms_int8_linear(const void *x, int64_t M, int64_t K, const int8_t *w, const float *w_scales,
                              const int32_t *w_sums, int64_t N, int passes, void *y, int is_float32,
                              int num_threads) {
    const int64_t x_row_bytes = K * (is_float32 ? 4 : 2);
    const int64_t R = M * passes, tiles = N / 32;
    const int amx = amx_usable && R >= AMX_MIN_ROWS && K % 64 == 0;
    /* the tile units read 16 step rows at a time: zero rows pad the last 16 */
    const int64_t padded_rows = amx ? round_up(R, AMX_ROWS) : R;
    const int64_t rows_per_call = amx ? 2 * AMX_ROWS : 4;
    uint8_t *steps = malloc((size_t)padded_rows * K);
    float *row_scales = malloc(sizeof(float) * R);
    float *out = malloc(sizeof(float) * M * N);
    if (steps == NULL || row_scales == NULL || out == NULL) {
        free(steps); free(row_scales); free(out);
        return -1;
    }
    memset(steps + R * K, 0, (size_t)(padded_rows - R) * K);
    #pragma omp parallel num_threads(num_threads)
    {
        if (amx) configure_tiles();
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_row((const char *)x + m * x_row_bytes, is_float32, K, passes, steps + m * passes * K,
                         row_scales + m * passes);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int8_t *wt = w + t * K * 32;
            int32_t sums[2 * AMX_ROWS * 32];
            for (int64_t r0 = 0; r0 < R; r0 += rows_per_call) {
                int rows = R - r0 < rows_per_call ? (int)(R - r0) : (int)rows_per_call;
                if (amx)
                    tile_sums_amx(steps + r0 * K, K, wt, rows > AMX_ROWS ? 2 : 1, 0, sums);
                else
                    switch (rows) { /* constant row counts: the accumulators stay in registers */
                        case 4: int8_tile(steps + r0 * K, K, wt, 4, sums); break;
                        case 3: int8_tile(steps + r0 * K, K, wt, 3, sums); break;
                        case 2: int8_tile(steps + r0 * K, K, wt, 2, sums); break;
                        default: int8_tile(steps + r0 * K, K, wt, 1, sums); break;
                    }
                for (int r = 0; r < rows; r++) {
                    int64_t m = (r0 + r) / passes, pass = (r0 + r) % passes;
                    float *o = out + m * N + t * 32;
                    for (int n = 0; n < 32; n++) {
                        float part = row_scales[r0 + r]
                            * (float)(sums[r * 32 + n] - INT8_ZERO_POINT * w_sums[t * 32 + n]);
                        o[n] = pass ? o[n] + part : part;
                    }
                }
            }
            for (int64_t m = 0; m < M; m++)
                for (int half = 0; half < 2; half++) {
                    int64_t at = m * N + t * 32 + 16 * half;
                    __m512 o = _mm512_mul_ps(_mm512_loadu_ps(out + at), _mm512_loadu_ps(w_scales + t * 32 + 16 * half));
                    if (is_float32)
                        _mm512_storeu_ps((float *)y + at, o);
                    else
                        store_bf16x16((uint16_t *)y + at, o);
                }
        }
        if (amx) _tile_release();
    }
    free(steps); free(row_scales); free(out);
    return 0;
}

/* ---- decode attention over the paged KV cache ---------------------------------------------------
 *
 * One query token per sequence, its keys and values read in place from their cache blocks (no
 * gathered copy), scores and softmax in float32, the softmax taken chunk by chunk with a running
 * maximum. One work item per (sequence, query head).
 */

#define ATTENTION_CHUNK 64

/* e^x in float32 for x <= 0 (Cephes' expf: a degree-6 polynomial on a range-reduced argument) */
KERNEL_TARGET INLINE __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* q: rows of H heads of hd, q_row_stride apart; out: (D, H, hd); caches: (blocks, block_size, KVH,
 * hd); block_tables: (D, table_stride); context_lens: (D,), the new token's key included; window: 0,
 * or a key at position p is seen only if p > context_len - 1 - window. hd % 32 == 0, hd <= 256,
 * H % KVH == 0. */
KERNEL_TARGET static void paged_decode_attention(const uint16_t *q, int64_t q_row_stride, const uint16_t *k_cache,
                                                 const uint16_t *v_cache, const int64_t *block_tables,
                                                 int64_t table_stride, const int64_t *context_lens, int64_t window,
                                                 int64_t D, int64_t H, int64_t KVH, int64_t hd, int64_t block_size,
                                                 float scale, uint16_t *out, int num_threads) {
    const int64_t group = H / KVH, vectors = hd / 16;
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t item = 0; item < D * H; item++) {
        const int64_t d = item / H, h = item % H, kv_head = h / group;
        const int64_t context_len = context_lens[d];
        const int64_t first = window > 0 && context_len > window ? context_len - window : 0;
        const int64_t *table = block_tables + d * table_stride;
        const uint16_t *query_row = q + d * q_row_stride + h * hd;
        __m512bh query[8];
        for (int64_t j = 0; j < hd / 32; j++) query[j] = (__m512bh)_mm512_loadu_si512(query_row + 32 * j);
        __m512 acc[16];
        for (int64_t j = 0; j < vectors; j++) acc[j] = _mm512_setzero_ps();
        float running_max = -__builtin_inff(), running_sum = 0.f;
        float scores[ATTENTION_CHUNK];
        int64_t offsets[ATTENTION_CHUNK]; /* of each key's row in the caches */
        for (int64_t start = first; start < context_len; start += ATTENTION_CHUNK) {
            const int n = context_len - start < ATTENTION_CHUNK ? (int)(context_len - start) : ATTENTION_CHUNK;
            float chunk_max = -__builtin_inff();
            int64_t block_index = start / block_size, in_block = start % block_size; /* no division per key */
            for (int i = 0; i < n; i++) {
                const int64_t slot = table[block_index] * block_size + in_block;
                if (++in_block == block_size) in_block = 0, block_index++;
                offsets[i] = (slot * KVH + kv_head) * hd;
                const uint16_t *key = k_cache + offsets[i];
                __m512 dot = _mm512_setzero_ps();
                for (int64_t j = 0; j < hd / 32; j++)
                    dot = _mm512_dpbf16_ps(dot, (__m512bh)_mm512_loadu_si512(key + 32 * j), query[j]);
                scores[i] = _mm512_reduce_add_ps(dot) * scale;
                chunk_max = scores[i] > chunk_max ? scores[i] : chunk_max;
            }
            const float new_max = chunk_max > running_max ? chunk_max : running_max;
            const float correction = running_max == -__builtin_inff() ? 0.f : __builtin_expf(running_max - new_max);
            running_sum *= correction;
            for (int64_t j = 0; j < vectors; j++) acc[j] = _mm512_mul_ps(acc[j], _mm512_set1_ps(correction));
            for (int i = 0; i < n; i += 16) {
                __mmask16 valid = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
                __m512 s = _mm512_maskz_loadu_ps(valid, scores + i);
                __m512 p = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(s, _mm512_set1_ps(new_max))));
                running_sum += _mm512_reduce_add_ps(p);
                _mm512_mask_storeu_ps(scores + i, valid, p);
            }
            for (int i = 0; i < n; i++) {
                const uint16_t *value = v_cache + offsets[i];
                __m512 weight = _mm512_set1_ps(scores[i]);
                for (int64_t j = 0; j < vectors; j++)
                    acc[j] = _mm512_fmadd_ps(weight, bf16x16_to_float(value + 16 * j), acc[j]);
            }
            running_max = new_max;
        }
        __m512 inverse = _mm512_set1_ps(1.f / running_sum);
        for (int64_t j = 0; j < vectors; j++)
            store_bf16x16(out + item * hd + 16 * j, _mm512_mul_ps(acc[j], inverse));
    }
}

KERNEL_TARGET void ms_paged_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                             const int64_t *block_tables, int64_t table_stride,
                                             const int64_t *context_lens, int64_t window, int64_t D, int64_t H,
                                             int64_t KVH, int64_t hd, int64_t block_size, float scale,
                                             uint16_t *out, int num_threads) {
    paged_decode_attention(q, H * hd, k_cache, v_cache, block_tables, table_stride, context_lens, window, D, H, KVH,
                           hd, block_size, scale, out, num_threads);
}

/* ---- the small per-layer steps, fused -----------------------------------------------------------
 *
 * Each replaces several torch ops (RMSNorm alone is eight on the CPU, ~30 us for one token of a
 * 576-wide model) by one pass over the row. They round to bfloat16 where the model's torch ops do,
 * so they give the same numbers up to float32 rounding.
 */

/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)), rows of `dim` (dim % 16 == 0), bfloat16 */
KERNEL_TARGET void ms_rms_norm(const uint16_t *x, int64_t rows, int64_t dim, const uint16_t *weight, float eps,
                               uint16_t *out, int num_threads) {
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * dim;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < dim; j += 16) {
            __m512 v = bf16x16_to_float(row + j);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 inverse = _mm512_set1_ps(1.f / __builtin_sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps));
        for (int64_t j = 0; j < dim; j += 16) {
            __m512 normed = bf16_round_trip(_mm512_mul_ps(bf16x16_to_float(row + j), inverse));
            store_bf16x16(out + r * dim + j, _mm512_mul_ps(bf16x16_to_float(weight + j), normed));
        }
    }
}

/* out = bf16(bf16(silu(gate)) * up) for rows of gate_up = [gate | up], each `inner` wide (% 16 == 0) */
KERNEL_TARGET void ms_silu_and_mul(const uint16_t *gate_up, int64_t rows, int64_t inner, uint16_t *out,
                                   int num_threads) {
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = gate_up + r * 2 * inner, *up = gate + inner;
        for (int64_t j = 0; j < inner; j += 16) {
            __m512 g = bf16x16_to_float(gate + j);
            /* silu(g) = g / (1 + e^-g), with e^-g = e^-|g| or its inverse, so the exponent stays <= 0 */
            __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
            __m512 one = _mm512_set1_ps(1.f);
            __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
            /* g >= 0: g / (1 + e); g < 0: g * e / (1 + e) */
            __m512 silu = _mm512_div_ps(_mm512_mask_mul_ps(g, negative, g, e), _mm512_add_ps(one, e));
            __m512 product = _mm512_mul_ps(bf16_round_trip(silu), bf16x16_to_float(up + j));
            store_bf16x16(out + r * inner + j, product);
        }
    }
}

/* In place in qkv (rows, H + 2 KVH, hd): rotate the q and k heads (rotate-half layout) by
 * bf16(bf16(x * cos) + bf16(roll(x, hd/2) * signed_sin)), cos and signed_sin (rows, hd) bfloat16;
 * then copy each row's k and v heads into the caches (blocks * block_size slots, KVH, hd) at
 * slots[row]. hd % 32 == 0. */
KERNEL_TARGET void ms_rotary_and_cache(uint16_t *qkv, int64_t rows, int64_t H, int64_t KVH, int64_t hd,
                                       const uint16_t *cos, const uint16_t *signed_sin, uint16_t *k_cache,
                                       uint16_t *v_cache, const int64_t *slots, int num_threads) {
    const int64_t half = hd / 2, heads = H + 2 * KVH;
    #pragma omp parallel for schedule(static) num_threads(num_threads) if (rows > 8)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t h = 0; h < H + KVH; h++) {
            uint16_t *x = qkv + (r * heads + h) * hd;
            uint16_t rotated[256];
            for (int64_t j = 0; j < hd; j += 16) {
                const int64_t partner = j < half ? j + half : j - half; /* roll by half */
                __m512 a = _mm512_mul_ps(bf16x16_to_float(x + j), bf16x16_to_float(cos + r * hd + j));
                __m512 b = _mm512_mul_ps(bf16x16_to_float(x + partner), bf16x16_to_float(signed_sin + r * hd + j));
                store_bf16x16(rotated + j, _mm512_add_ps(bf16_round_trip(a), bf16_round_trip(b)));
            }
            memcpy(x, rotated, hd * sizeof *x);
        }
        const uint16_t *k = qkv + (r * heads + H) * hd, *v = k + KVH * hd;
        memcpy(k_cache + slots[r] * KVH * hd, k, KVH * hd * sizeof *k);
        memcpy(v_cache + slots[r] * KVH * hd, v, KVH * hd * sizeof *v);
    }
}

/* ---- bfloat16 weights ----------------------------------------------------------------------------
 *
 * w: [N/32 tiles][K/2 pairs][2 blocks][32 bfloat16]: in block b of tile t, element 2i + e of pair p
 * is row t*32 + b*16 + i, input 2p + e, so one `vdpbf16ps` takes a pair of inputs for 16 rows.
 */

/* one input row; even and odd pairs in separate accumulators (the dot product's latency) */
KERNEL_TARGET INLINE void bf16_tile_1row(const uint16_t *x, int64_t K, const uint16_t *wt, uint16_t *y) {
    __m512 even0 = _mm512_setzero_ps(), odd0 = even0, even1 = even0, odd1 = even0;
    for (int64_t p = 0; p < K / 2; p += 2) {
        const uint16_t *wp = wt + p * 64;
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 128), _MM_HINT_T0);
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 128 + 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 128 + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 128 + 96), _MM_HINT_T0);
        const int32_t *xp = (const int32_t *)(x + 2 * p);
        __m512bh x0 = (__m512bh)_mm512_set1_epi32(xp[0]), x1 = (__m512bh)_mm512_set1_epi32(xp[1]);
        even0 = _mm512_dpbf16_ps(even0, (__m512bh)_mm512_loadu_si512(wp), x0);
        even1 = _mm512_dpbf16_ps(even1, (__m512bh)_mm512_loadu_si512(wp + 32), x0);
        odd0 = _mm512_dpbf16_ps(odd0, (__m512bh)_mm512_loadu_si512(wp + 64), x1);
        odd1 = _mm512_dpbf16_ps(odd1, (__m512bh)_mm512_loadu_si512(wp + 96), x1);
    }
    store_bf16x16(y, _mm512_add_ps(even0, odd0));
    store_bf16x16(y + 16, _mm512_add_ps(even1, odd1));
}

/* four input rows: each 64 bytes of weights serve four rows */
KERNEL_TARGET INLINE void bf16_tile_4rows(const uint16_t *x, int64_t K, const uint16_t *wt, uint16_t *y, int64_t N) {
    __m512 acc[2][4];
    for (int r = 0; r < 4; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < K / 2; p++) {
        const uint16_t *wp = wt + p * 64;
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(wp + PREFETCH_ITERATIONS * 64 + 32), _MM_HINT_T0);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
        for (int r = 0; r < 4; r++) {
            int32_t pair;
            memcpy(&pair, x + r * K + 2 * p, sizeof pair);
            __m512bh xr = (__m512bh)_mm512_set1_epi32(pair);
            acc[0][r] = _mm512_dpbf16_ps(acc[0][r], w0, xr);
            acc[1][r] = _mm512_dpbf16_ps(acc[1][r], w1, xr);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int b = 0; b < 2; b++)
            store_bf16x16(y + r * N + 16 * b, acc[b][r]);
}

/* ms_bf16_linear on the tile units */
AMX_TARGET static int bf16_linear_amx(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N,
                                      uint16_t *y, int num_threads) {
    /* the tile units read 16 input rows at a time: a copy padded with zero rows where M is not a
     * multiple of 16 */
    const int64_t padded_rows = round_up(M, AMX_ROWS);
    uint16_t *padded = NULL;
    if (padded_rows != M) {
        padded = malloc(sizeof *padded * padded_rows * K);
        if (padded == NULL) return -1;
        memcpy(padded, x, sizeof *x * M * K);
        memset(padded + M * K, 0, sizeof *x * (padded_rows - M) * K);
        x = padded;
    }
    #pragma omp parallel num_threads(num_threads)
    {
        configure_tiles();
        float sums[2 * AMX_ROWS * 32];
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < N / 32; t++) {
            const uint16_t *wt = w + t * K * 32;
            for (int64_t m0 = 0; m0 < M; m0 += 2 * AMX_ROWS) {
                const int64_t rows = M - m0 < 2 * AMX_ROWS ? M - m0 : 2 * AMX_ROWS;
                tile_sums_amx(x + m0 * K, K * sizeof *x, wt, rows > AMX_ROWS ? 2 : 1, 1, sums);
                for (int64_t r = 0; r < rows; r++)
                    for (int b = 0; b < 2; b++)
                        store_bf16x16(y + (m0 + r) * N + t * 32 + 16 * b, _mm512_loadu_ps(sums + r * 32 + 16 * b));
            }
        }
        _tile_release();
    }
    free(padded);
    return 0;
}

/* y (M, N) bfloat16 = x (M, K) bfloat16 @ w^T; K % 4 == 0, N % 32 == 0. Returns 0, or -1 when out
 * of memory. */
AMX_TARGET int ms_bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                              int num_threads) {
    if (amx_usable && M >= AMX_MIN_ROWS && K % 32 == 0) return bf16_linear_amx(x, M, K, w, N, y, num_threads);
    #pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < N / 32; t++) {
        const uint16_t *wt = w + t * K * 32;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) bf16_tile_4rows(x + m * K, K, wt, y + m * N + t * 32, N);
        for (; m < M; m++) bf16_tile_1row(x + m * K, K, wt, y + m * N + t * 32);
    }
    return 0;
}

/* ---- a whole decode step, in one call --------------------------------------------------------------
 *
 * Every decoder layer (int4 or bfloat16 projections) of a step of single-token decodes, with no
 * Python between the kernels above:
 * the step's ~300 small calls were ~40% of a decode step of the demo model. The same kernels, in
 * the order (and with the roundings) of the modules in cpu_layers.py.
 */

/* x = bf16(x + delta), as torch adds bfloat16 tensors; n % 16 == 0 */
KERNEL_TARGET static void add_in_place(uint16_t *x, const uint16_t *delta, int64_t n) {
    for (int64_t i = 0; i < n; i += 16)
        store_bf16x16(x + i, _mm512_add_ps(bf16x16_to_float(x + i), bf16x16_to_float(delta + i)));
}

KERNEL_TARGET static int linear_of(const uint16_t *x, int64_t rows, const LinearWeights *w, uint16_t *y,
                                   int num_threads) {
    if (w->is_bf16) return ms_bf16_linear(x, rows, w->in_features, w->weight, w->out_features, y, num_threads);
    return ms_int4_linear(x, rows, w->in_features, w->weight, w->scales_offsets, w->out_features, w->group_size, y,
                          num_threads);
}

/* x: (D, hidden) bfloat16, the embedded tokens in, the last layer's output out (in place); cos,
 * signed_sin: (D, head_dim) bfloat16; slots: each token's cache slot; block tables and context
 * lengths as for the decode attention. Returns 0, or -1 when out of memory. */
KERNEL_TARGET int ms_decode_layers(const LayerWeights *layers, int64_t num_layers, const DecoderShape *shape,
                                   uint16_t *x, int64_t D, const uint16_t *cos, const uint16_t *signed_sin,
                                   const int64_t *slots, const int64_t *block_tables, int64_t table_stride,
                                   const int64_t *context_lens, int num_threads) {
    const int64_t H = shape->num_heads, KVH = shape->num_kv_heads, hd = shape->head_dim, hidden = shape->hidden;
    const int64_t heads = H + 2 * KVH;
    const size_t row = sizeof(uint16_t) * D;
    uint16_t *normed = malloc(row * hidden), *qkv = malloc(row * heads * hd), *attended = malloc(row * H * hd);
    uint16_t *delta = malloc(row * hidden), *gate_up = malloc(row * 2 * shape->inner);
    uint16_t *act = malloc(row * shape->inner);
    int status = normed && qkv && attended && delta && gate_up && act ? 0 : -1;
    for (int64_t l = 0; l < num_layers && status == 0; l++) {
        const LayerWeights *layer = layers + l;
        /* attention */
        ms_rms_norm(x, D, hidden, layer->input_norm, shape->eps, normed, num_threads);
        status |= linear_of(normed, D, &layer->qkv, qkv, num_threads);
        ms_rotary_and_cache(qkv, D, H, KVH, hd, cos, signed_sin, layer->k_cache, layer->v_cache, slots, num_threads);
        paged_decode_attention(qkv, heads * hd, layer->k_cache, layer->v_cache, block_tables, table_stride,
                               context_lens, shape->window, D, H, KVH, hd, shape->block_size, shape->scale, attended,
                               num_threads);
        status |= linear_of(attended, D, &layer->o, delta, num_threads);
        add_in_place(x, delta, D * hidden);
        /* MLP */
        ms_rms_norm(x, D, hidden, layer->post_attention_norm, shape->eps, normed, num_threads);
        status |= linear_of(normed, D, &layer->gate_up, gate_up, num_threads);
        ms_silu_and_mul(gate_up, D, shape->inner, act, num_threads);
        status |= linear_of(act, D, &layer->down, delta, num_threads);
        add_in_place(x, delta, D * hidden);
    }
    free(normed); free(qkv); free(attended); free(delta); free(gate_up); free(act);
    return status;
}
