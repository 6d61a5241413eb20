/* The interface of our CPU kernels (kernels.c): the one declaration of every exported function and
 * structure. kernels.c includes this file, so the compiler holds the definitions to it; kernels.py
 * reads it to bind the functions (ctypes argument and return types, structure fields), so Python
 * never restates a declaration by hand. Keep to the forms this file uses — one `MS_API` declaration
 * per function, `typedef struct { ... } Name;` with one field type per line — which kernels.py parses.
 *
 * A built library says which sources it was built from (ms_source_id: a hash of this file and
 * kernels.c, see build.py), and kernels.py refuses one built from other sources instead of calling
 * it with the wrong arguments.
 *
 * Shapes: M input rows, K inputs, N outputs; bfloat16 is passed as uint16_t. Every kernel takes the
 * caller's thread count last. */

#ifndef MISTRAL_SERVE_KERNELS_H
#define MISTRAL_SERVE_KERNELS_H

#include <stdint.h>

#define MS_API __attribute__((visibility("default")))

/* an int4 or bfloat16 layer in the kernels' layout (layouts.py) */
typedef struct {
    const void *weight; /* int4 or bfloat16, in the kernel's layout */
    const float *scales_offsets; /* int4 only */
    int64_t out_features;
    int64_t in_features;
    int64_t group_size;
    int64_t is_bf16;
} LinearWeights;

/* a decoder layer's norms and projections, and its KV cache */
typedef struct {
    const uint16_t *input_norm;
    const uint16_t *post_attention_norm;
    LinearWeights qkv;
    LinearWeights o;
    LinearWeights gate_up;
    LinearWeights down;
    uint16_t *k_cache;
    uint16_t *v_cache;
} LayerWeights;

typedef struct {
    int64_t hidden;
    int64_t inner;
    int64_t num_heads;
    int64_t num_kv_heads;
    int64_t head_dim;
    int64_t block_size;
    int64_t window;
    float eps;
    float scale;
} DecoderShape;

/* which sources the library was built from: build.py's source_id() */
MS_API const char *ms_source_id(void);
/* sizeof of a structure declared above, by name; -1 for an unknown name */
MS_API int64_t ms_struct_size(const char *name);
/* 1 where the CPU has what the kernels need (AVX-512 F/BW/VL with bfloat16 and int8 dot products) */
MS_API int ms_cpu_supported(void);
/* lets the int8 and bfloat16 matmuls use the tile units (AMX), or not; returns whether they do */
MS_API int ms_enable_amx(int wanted);

/* y (M, N) bfloat16 = x (M, K) bfloat16 @ int4 weights; returns 0, or -1 when out of memory */
MS_API int ms_int4_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *sz, int64_t N,
                          int64_t G, uint16_t *y, int num_threads);
/* y (M, N) = x (M, K) @ int8 weights, x and y bfloat16 or float32 (is_float32); returns 0 or -1 */
MS_API int ms_int8_linear(const void *x, int64_t M, int64_t K, const int8_t *w, const float *w_scales,
                          const int32_t *w_sums, int64_t N, int passes, void *y, int is_float32, int num_threads);
/* y (M, N) bfloat16 = x (M, K) bfloat16 @ bfloat16 weights; returns 0 or -1 */
MS_API int ms_bf16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, uint16_t *y,
                          int num_threads);
/* one query token per sequence (D of them) against its paged KV cache */
MS_API void ms_paged_decode_attention(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                                      const int64_t *block_tables, int64_t table_stride, const int64_t *context_lens,
                                      int64_t window, int64_t D, int64_t H, int64_t KVH, int64_t hd,
                                      int64_t block_size, float scale, uint16_t *out, int num_threads);
MS_API void ms_rms_norm(const uint16_t *x, int64_t rows, int64_t dim, const uint16_t *weight, float eps,
                        uint16_t *out, int num_threads);
MS_API void ms_silu_and_mul(const uint16_t *gate_up, int64_t rows, int64_t inner, uint16_t *out, int num_threads);
MS_API void ms_rotary_and_cache(uint16_t *qkv, int64_t rows, int64_t H, int64_t KVH, int64_t hd,
                                const uint16_t *cos, const uint16_t *signed_sin, uint16_t *k_cache,
                                uint16_t *v_cache, const int64_t *slots, int num_threads);
/* every decoder layer of a decode-only step, in place on x (D, hidden); returns 0 or -1 */
MS_API int ms_decode_layers(const LayerWeights *layers, int64_t num_layers, const DecoderShape *shape, uint16_t *x,
                            int64_t D, const uint16_t *cos, const uint16_t *signed_sin, const int64_t *slots,
                            const int64_t *block_tables, int64_t table_stride, const int64_t *context_lens,
                            int num_threads);

#endif
