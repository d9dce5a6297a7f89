/* A decode step's decoder layers in one call: for every layer, in order,
 *   h = RMSNorm(residual += x); qkv = h Wqkv; rotate q, k and write k, v to the cache;
 *   attention over the paged cache; x = attn Wo; h = RMSNorm(residual += x);
 *   x = (silu(h Wgate) * h Wup) Wdown
 * with the same kernels, in the same order and on the same thread counts as the Python
 * layer by layer path (tokenmill/model/llama.py), so its results are bit-identical to that
 * path's; only the Python and ctypes work between the kernels (a few microseconds each,
 * ~10 calls per layer) is gone. Rows are single-token decodes (one query each).
 */
#include "layer_ops.c"
#include "paged_attention.c"
#include "quant_matmul.c"

typedef struct {
    const uint8_t *values;   /* float16 panels or GGUF values (quant_matmul.c) */
    const uint16_t *scales;  /* GGUF scales; NULL for float16 panels */
    int64_t type;            /* 0: float16 panels, else the GGML type */
    int64_t out_features;
} Projection;

typedef struct {
    const float *input_norm, *post_attention_norm; /* [C] */
    Projection qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [S, Hkv, D] in cache_format (kv_format.h) */
    int64_t window;          /* sliding window of its attention; 0: none */
} Layer;

typedef struct {
    int64_t hidden, num_heads, num_kv_heads, head_dim, intermediate;
    int64_t num_positions, num_slots, block_size, cache_format;
    float eps, scale;
} Shape;

static int project(const Projection *p, const float *x, int64_t rows, int64_t in_features,
                   float *y, int n_threads) {
    if (p->type == 0)
        return tm_f16_matmul(x, rows, in_features, (const uint16_t *)p->values, p->out_features,
                             NULL, y, n_threads);
    return tm_quant_matmul(x, rows, in_features, p->values, p->scales, p->out_features,
                           (int)p->type, NULL, y, n_threads);
}

/* x [T, C]: the embeddings in, the last layer's MLP output out; residual [T, C]: the sum
 * before it (written). attention_threads as paged_attention.py would choose. Returns 0, or
 * 1 on a position, slot or shape out of range, or no memory. */
int tm_decode_layers(const Layer *layers, int64_t num_layers, const Shape *s, float *x,
                     float *residual, int64_t rows, const float *cos_sin,
                     const int64_t *positions, const int64_t *slots, const int64_t *tables,
                     const int64_t *lens, int64_t max_blocks, int n_threads,
                     int attention_threads) {
    const int64_t C = s->hidden, H = s->num_heads, Hkv = s->num_kv_heads, D = s->head_dim;
    const int64_t I = s->intermediate, width = (H + 2 * Hkv) * D;
    const int64_t floats = rows * (C + width + H * D + Hkv * D + H * D + 2 * I + I);
    float *buffer = malloc(sizeof(float) * floats);
    if (buffer == NULL) return 1;
    float *h = buffer, *qkv = h + rows * C, *q = qkv + rows * width, *k = q + rows * H * D;
    float *attn = k + rows * Hkv * D, *gate_up = attn + rows * H * D, *act = gate_up + rows * 2 * I;
    int status = 0;
    for (int64_t i = 0; i < num_layers && status == 0; i++) {
        const Layer *l = layers + i;
        if (i == 0) {
            memcpy(residual, x, sizeof(float) * rows * C);
            tm_add_rms_norm(residual, residual, l->input_norm, h, rows, C, s->eps, 0);
        } else {
            tm_add_rms_norm(x, residual, l->input_norm, h, rows, C, s->eps, 1);
        }
        status |= project(&l->qkv, h, rows, C, qkv, n_threads);
        status |= tm_rope_and_cache(qkv, cos_sin, positions, slots, q, k, l->k_cache, l->v_cache,
                                    rows, H, Hkv, D, s->num_positions, s->num_slots, (int)s->cache_format);
        if (status) break;
        status |= tm_paged_decode_attention(q, l->k_cache, l->v_cache, tables, lens, attn, rows,
                                            H, Hkv, D, s->block_size, max_blocks, s->scale,
                                            l->window, attention_threads, (int)s->cache_format);
        status |= project(&l->o, attn, rows, H * D, x, n_threads);
        tm_add_rms_norm(x, residual, l->post_attention_norm, h, rows, C, s->eps, 1);
        status |= project(&l->gate_up, h, rows, C, gate_up, n_threads);
        tm_silu_mul(gate_up, act, rows, I);
        status |= project(&l->down, act, rows, I, x, n_threads);
    }
    free(buffer);
    return status;
}
