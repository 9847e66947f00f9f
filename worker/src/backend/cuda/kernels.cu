// The CUDA backend's kernels, compiled at run time with NVRTC. No headers: bf16 and f16 are
// converted with bit operations and PTX, so the source compiles with any NVRTC.
//
// Activations are f32 [rows, cols] row-major; weights and the KV cache are f32, bf16 or f16.
// Each templated kernel is instantiated below for the three element types.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define INF_F __int_as_float(0x7f800000)

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __uint_as_float(((u32)x.bits) << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(x.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as torch does.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
    u32 u = __float_as_uint(x);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (u16)(u >> 16);
    }
    return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
    f16 r;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(r.bits) : "f"(x));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (all threads must call it); every thread gets the result.
__device__ double block_sum(double v) {
    __shared__ double part[32];
    __shared__ double total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum_d(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < warps; ++w) s += part[w];
        total = s;
    }
    __syncthreads();
    double r = total;
    __syncthreads();
    return r;
}

// The better of two (value, index) candidates: larger value, then lower index. An index of
// -1 means none.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    if (i < 0) return false;
    if (bi < 0) return true;
    return v > bv || (v == bv && i < bi);
}

// Best (value, index) over the block; every thread gets the result.
__device__ void block_best(float &v, int &i) {
    __shared__ float pv[32];
    __shared__ int pi[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
    if (lane == 0) { pv[warp] = v; pi[warp] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < warps; ++w)
            if (better(pv[w], pi[w], pv[0], pi[0])) { pv[0] = pv[w]; pi[0] = pi[w]; }
    }
    __syncthreads();
    v = pv[0];
    i = pi[0];
    __syncthreads();
}

// ---- element-wise -------------------------------------------------------------------------

template <typename T>
__device__ void cast_from_f32(const float *x, T *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(x[i]);
}

// f32 activations as two rows of 2-byte values for cuBLAS: `out[0..n)` = hi = T(x) and
// `out[n..2n)` = lo = T(x - hi), so hi + lo carries x to about 2^-17 relative.
template <typename T>
__device__ void split_from_f32(const float *x, T *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        T hi = from_f32<T>(x[i]);
        out[i] = hi;
        out[n + i] = from_f32<T>(x[i] - to_f32(hi));
    }
}

// out = the hi half of a split product plus its lo half.
extern "C" __global__ void add_halves_f32(const float *both, float *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = both[i] + both[n + i];
}

template <typename T>
__device__ void cast_to_f32(const T *x, float *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = to_f32(x[i]);
}

extern "C" __global__ void add_f32(const float *a, const float *b, float *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = a[i] + b[i];
}

extern "C" __global__ void silu_mul_f32(const float *gate, const float *up, float *out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// One block per row: x / rms(x) * weight.
extern "C" __global__ void rms_norm_f32(const float *x, const float *weight, float *out, int cols, float eps) {
    const float *row = x + (u64)blockIdx.x * cols;
    float *o = out + (u64)blockIdx.x * cols;
    double ss = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) ss += (double)(row[c] * row[c]);
    float ms = (float)(block_sum(ss) / cols);
    float inv = 1.0f / sqrtf(ms + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = weight[c] * (row[c] * inv);
}

// One block per row: sum = x + residual, out = sum / rms(sum) * weight.
extern "C" __global__ void add_rms_norm_f32(const float *x, const float *residual, const float *weight, float *sum,
                                            float *out, int cols, float eps) {
    u64 base = (u64)blockIdx.x * cols;
    double ss = 0.0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = x[base + c] + residual[base + c];
        sum[base + c] = v;
        ss += (double)(v * v);
    }
    float ms = (float)(block_sum(ss) / cols);
    float inv = 1.0f / sqrtf(ms + eps);
    // Each thread reads back only the sums it wrote.
    for (int c = threadIdx.x; c < cols; c += blockDim.x) out[base + c] = weight[c] * (sum[base + c] * inv);
}

// Rotate-half RoPE with the host's inverse frequencies (f32 bits). One block per row; threads
// over (head, i < head_dim / 2).
extern "C" __global__ void rope_f32(const float *x, float *out, const u32 *positions, const u32 *inv_freq_bits, int heads,
                                    int head_dim) {
    int half = head_dim / 2;
    u64 base = (u64)blockIdx.x * heads * head_dim;
    float pos = (float)positions[blockIdx.x];
    for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
        int h = t / half, i = t % half;
        float s, c;
        sincosf(pos * __uint_as_float(inv_freq_bits[i]), &s, &c);
        u64 at = base + (u64)h * head_dim;
        float a = x[at + i], b = x[at + i + half];
        out[at + i] = a * c - b * s;
        out[at + i + half] = b * c + a * s;
    }
}

// ---- rows ---------------------------------------------------------------------------------

// One block per output row: out[r] = table[ids[r]] as f32.
template <typename T>
__device__ void embedding(const T *table, const u32 *ids, float *out, int cols) {
    const T *src = table + (u64)ids[blockIdx.x] * cols;
    float *o = out + (u64)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = to_f32(src[c]);
}

extern "C" __global__ void gather_rows_f32(const float *x, const u32 *rows, float *out, int cols) {
    const float *src = x + (u64)rows[blockIdx.x] * cols;
    float *o = out + (u64)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = src[c];
}

// out[rows[i]] += weights[i] * src[i]; one block per i. The rows of one launch are distinct.
extern "C" __global__ void scatter_add_rows_f32(float *out, const float *src, const u32 *rows, const float *weights, int cols) {
    float w = weights[blockIdx.x];
    const float *s = src + (u64)blockIdx.x * cols;
    float *o = out + (u64)rows[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] += w * s[c];
}

// ---- products -----------------------------------------------------------------------------

// Eight 2-byte values packed in 16 bytes, as f32.
template <typename T>
__device__ __forceinline__ void unpack8(uint4 packed, float out[8]) {
    u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        T lo, hi;
        lo.bits = (u16)(words[q] & 0xffffu);
        hi.bits = (u16)(words[q] >> 16);
        out[2 * q] = to_f32(lo);
        out[2 * q + 1] = to_f32(hi);
    }
}

// The dot product of eight weights with x[8 * v .. 8 * v + 8) of row `xr`.
__device__ __forceinline__ float dot8(const float w[8], const float *xr, int v) {
    const float4 *p = (const float4 *)xr + 2 * v;
    float4 a = __ldg(p), b = __ldg(p + 1);
    return w[0] * a.x + w[1] * a.y + w[2] * a.z + w[3] * a.w + w[4] * b.x + w[5] * b.y + w[6] * b.z + w[7] * b.w;
}

// Small-batch x · Wᵀ for 2-byte weights (the decode shape): one warp per output feature,
// 16-byte loads of W, all `m` (<= 4) rows of x (f32) at once. Needs k % 8 == 0.
template <typename T>
__device__ void gemv_small(const T *w, const float *x, float *out, int m, int n, int k) {
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (j >= n) return;
    const uint4 *wr = (const uint4 *)(w + (u64)j * k);
    int nvec = k >> 3;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int v = lane; v < nvec; v += 32) {
        float wf[8];
        unpack8<T>(wr[v], wf);
#pragma unroll
        for (int r = 0; r < 4; ++r)
            if (r < m) acc[r] += dot8(wf, x + (u64)r * k, v);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && r < m) out[(u64)r * n + j] = s;
    }
}

// SwiGLU's first half for small batches: each warp takes row j of both `gate` and `up`,
// all `m` (<= 4) rows of x, and writes silu(x · gate_j) * (x · up_j). Needs k % 8 == 0.
template <typename T>
__device__ void gemv_swiglu(const T *gate, const T *up, const float *x, float *out, int m, int n, int k) {
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (j >= n) return;
    const uint4 *gr = (const uint4 *)(gate + (u64)j * k);
    const uint4 *ur = (const uint4 *)(up + (u64)j * k);
    int nvec = k >> 3;
    float g_acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, u_acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
    for (int v = lane; v < nvec; v += 32) {
        float gf[8], uf[8];
        unpack8<T>(gr[v], gf);
        unpack8<T>(ur[v], uf);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            if (r < m) {
                g_acc[r] += dot8(gf, x + (u64)r * k, v);
                u_acc[r] += dot8(uf, x + (u64)r * k, v);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        float g = warp_sum(g_acc[r]), u = warp_sum(u_acc[r]);
        if (lane == 0 && r < m) out[(u64)r * n + j] = g / (1.0f + expf(-g)) * u;
    }
}

// ---- KV cache and attention ---------------------------------------------------------------

// Cache layout per layer: [slots, kv_heads * head_dim] for K and for V.
template <typename T>
__device__ void write_kv(const float *k, const float *v, T *kc, T *vc, const u32 *slots, int width) {
    u64 dst = (u64)slots[blockIdx.x] * width, src = (u64)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        kc[dst + c] = from_f32<T>(k[src + c]);
        vc[dst + c] = from_f32<T>(v[src + c]);
    }
}

#define ATTN_WARPS 16
#define MAX_HEAD_DIM 256

// Causal (optionally sliding-window) paged attention. Grid (rows, heads), ATTN_WARPS warps per
// block. Each warp walks its share of the row's keys with an online softmax; lanes split the
// head dimension. The warps' partial results are merged at the end.
template <typename T>
__device__ void paged_attention(const float *q, const T *kc, const T *vc, float *out, const u32 *row_seq,
                                const u32 *positions, const u32 *table_start, const u32 *tables, int heads,
                                int kv_heads, int head_dim, int block_size, int window, float scale) {
    __shared__ float sm_m[ATTN_WARPS], sm_l[ATTN_WARPS];
    __shared__ float sm_acc[ATTN_WARPS][MAX_HEAD_DIM];
    int row = blockIdx.x, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int kvh = h / (heads / kv_heads);
    u64 width = (u64)kv_heads * head_dim;
    int pos = (int)positions[row];
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    const u32 *table = tables + table_start[row_seq[row]];
    const float *qh = q + ((u64)row * heads + h) * head_dim;
    float qv[8], acc[8];
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        int d = lane + 32 * t;
        qv[t] = d < head_dim ? qh[d] * scale : 0.0f;
        acc[t] = 0.0f;
    }
    float m = -INF_F, l = 0.0f;
    for (int p = first + warp; p <= pos; p += ATTN_WARPS) {
        u64 slot = (u64)table[p / block_size] * block_size + p % block_size;
        const T *kh = kc + slot * width + (u64)kvh * head_dim;
        const T *vh = vc + slot * width + (u64)kvh * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            int d = lane + 32 * t;
            if (d < head_dim) s += qv[t] * to_f32(kh[d]);
        }
        s = warp_sum(s);
        float m_new = fmaxf(m, s);
        float corr = expf(m - m_new);
        float e = expf(s - m_new);
        l = l * corr + e;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
            int d = lane + 32 * t;
            if (d < head_dim) acc[t] = acc[t] * corr + e * to_f32(vh[d]);
        }
        m = m_new;
    }
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int t = 0; t < 8; ++t) {
        int d = lane + 32 * t;
        if (d < head_dim) sm_acc[warp][d] = acc[t];
    }
    __syncthreads();
    float mm = -INF_F;
    for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, sm_m[w]);
    float ll = 0.0f;
    for (int w = 0; w < ATTN_WARPS; ++w) ll += sm_l[w] * expf(sm_m[w] - mm);
    float *o = out + ((u64)row * heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) s += sm_acc[w][d] * expf(sm_m[w] - mm);
        o[d] = s / ll;
    }
}

// ---- MoE routing --------------------------------------------------------------------------

// One thread per token: softmax over `experts` (<= 256), top-k (ties to the lower expert),
// weights renormalised over the chosen.
extern "C" __global__ void router_top_k_f32(const float *logits, int tokens, int experts, int k, u32 *ids, float *weights) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float *row = logits + (u64)t * experts;
    float mx = -INF_F;
    for (int e = 0; e < experts; ++e) mx = fmaxf(mx, row[e]);
    float sum = 0.0f;
    for (int e = 0; e < experts; ++e) sum += expf(row[e] - mx);
    u32 taken[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float total = 0.0f;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        float bv = 0.0f;
        for (int e = 0; e < experts; ++e) {
            if (taken[e >> 5] & (1u << (e & 31))) continue;
            float v = expf(row[e] - mx);
            if (best < 0 || v > bv) { best = e; bv = v; }
        }
        taken[best >> 5] |= 1u << (best & 31);
        ids[(u64)t * k + j] = (u32)best;
        weights[(u64)t * k + j] = bv / sum;
        total += bv / sum;
    }
    for (int j = 0; j < k; ++j) weights[(u64)t * k + j] /= total;
}

// ---- choosing tokens ----------------------------------------------------------------------

// Per row, 8 words: mode (0 skip, 1 score `token`, 2 sample), token, temperature (f32 bits),
// top_k (0 = off), top_p (f32 bits), top_n, then the uniform draw u in [0, 1) as the low and
// high words of an f64.
#define CHOICE_WORDS 8
#define MAX_TOP 20
// Per row out: token, logprob (f32 bits), then MAX_TOP (id, logprob bits) pairs.
#define CHOSEN_WORDS (2 + 2 * MAX_TOP)

// Order-preserving map of a float to an unsigned key (larger float, larger key).
__device__ __forceinline__ u32 float_key(float f) {
    u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Number of logits whose key is >= `threshold`.
__device__ double count_at_least(const float *row, int vocab, u32 threshold) {
    double c = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += float_key(row[i]) >= threshold ? 1.0 : 0.0;
    return block_sum(c);
}

// Tempered mass exp((l - max) / temperature) of the logits whose key is >= `threshold`.
__device__ double mass_at_least(const float *row, int vocab, u32 threshold, float mx, float temp) {
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float l = row[i];
        if (float_key(l) >= threshold) s += (double)expf((l - mx) / temp);
    }
    return block_sum(s);
}

// One block per row. Greedy and scored rows take the argmax or the given token; sampled rows
// draw from the tempered distribution restricted to the top-k and then the top-p nucleus, by
// inverse CDF over the kept tokens in id order (as the host sampler draws). Every row reports
// its token's logprob under the untempered distribution and its top_n alternatives.
extern "C" __global__ void __launch_bounds__(1024) choose_tokens(const float *logits, int vocab, const u32 *choices, u32 *chosen) {
    __shared__ double chunk_mass[1024];
    __shared__ int picked;
    const float *row = logits + (u64)blockIdx.x * vocab;
    const u32 *c = choices + (u64)blockIdx.x * CHOICE_WORDS;
    u32 *o = chosen + (u64)blockIdx.x * CHOSEN_WORDS;
    u32 mode = c[0];
    if (mode == 0) return;
    float temp = __uint_as_float(c[2]);
    u32 top_k = c[3];
    float top_p = __uint_as_float(c[4]);
    int top_n = (int)min(c[5], (u32)MAX_TOP);
    double u = __longlong_as_double((long long)(((u64)c[7] << 32) | (u64)c[6]));

    float mx = -INF_F;
    int arg = -1;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        if (better(row[i], i, mx, arg)) { mx = row[i]; arg = i; }
    block_best(mx, arg);
    double z = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += (double)expf(row[i] - mx);
    double log_z = (double)mx + log(block_sum(z));

    int token = mode == 1 ? (int)c[1] : arg;
    if (mode == 2 && temp > 0.0f) {
        // The k-th largest key, bit by bit from the top.
        u32 floor_key = 0;
        if (top_k > 0 && top_k < (u32)vocab) {
            for (int bit = 31; bit >= 0; --bit) {
                u32 cand = floor_key | (1u << bit);
                if (count_at_least(row, vocab, cand) >= (double)top_k) floor_key = cand;
            }
        }
        // The largest key whose tempered mass at or above it reaches top_p of the kept mass.
        double kept = mass_at_least(row, vocab, floor_key, mx, temp);
        if (top_p < 1.0f) {
            double want = (double)top_p * kept;
            u32 key = 0;
            for (int bit = 31; bit >= 0; --bit) {
                u32 cand = key | (1u << bit);
                if (mass_at_least(row, vocab, max(cand, floor_key), mx, temp) >= want) key = cand;
            }
            if (key > floor_key) {
                floor_key = key;
                kept = mass_at_least(row, vocab, floor_key, mx, temp);
            }
        }
        // Inverse CDF: each thread owns a contiguous chunk; the one whose range holds the
        // target finds the token in it.
        int chunk = (vocab + blockDim.x - 1) / blockDim.x;
        int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);
        double mine = 0.0;
        int last_kept = -1;
        for (int i = begin; i < end; ++i) {
            if (float_key(row[i]) >= floor_key) {
                mine += (double)expf((row[i] - mx) / temp);
                last_kept = i;
            }
        }
        // Should rounding put the target past every chunk, the last kept token is drawn.
        float last_v = (float)last_kept;
        block_best(last_v, last_kept);
        chunk_mass[threadIdx.x] = mine;
        if (threadIdx.x == 0) picked = last_kept;
        __syncthreads();
        double before = 0.0;
        for (int t = 0; t < (int)threadIdx.x; ++t) before += chunk_mass[t];
        double target = (double)u * kept;
        if (mine > 0.0 && target >= before && target < before + mine) {
            double cum = before;
            int last = -1;
            for (int i = begin; i < end; ++i) {
                if (float_key(row[i]) < floor_key) continue;
                last = i;
                cum += (double)expf((row[i] - mx) / temp);
                if (target < cum) break;
            }
            picked = last;
        }
        __syncthreads();
        token = picked;
    }
    // Alternatives: the next best after the previous one in (value desc, index asc) order.
    float pv = INF_F;
    int pi = -1;
    for (int j = 0; j < top_n; ++j) {
        float bv = -INF_F;
        int bi = -1;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float v = row[i];
            bool after = v < pv || (v == pv && i > pi);
            if (after && better(v, i, bv, bi)) { bv = v; bi = i; }
        }
        block_best(bv, bi);
        if (bi < 0) break;
        if (threadIdx.x == 0) {
            o[2 + 2 * j] = (u32)bi;
            o[3 + 2 * j] = __float_as_uint((float)((double)bv - log_z));
        }
        pv = bv;
        pi = bi;
    }
    if (threadIdx.x == 0) {
        o[0] = (u32)token;
        o[1] = __float_as_uint((float)((double)row[token] - log_z));
    }
}

// ---- instantiations -----------------------------------------------------------------------

#define FOR_TYPE(T, S)                                                                               \
    extern "C" __global__ void embedding_##S(const T *table, const u32 *ids, float *out, int cols) {          \
        embedding<T>(table, ids, out, cols);                                                        \
    }                                                                                               \
    extern "C" __global__ void write_kv_##S(const float *k, const float *v, T *kc, T *vc, const u32 *slots, \
                                            int width) {                                             \
        write_kv<T>(k, v, kc, vc, slots, width);                                                    \
    }                                                                                               \
    extern "C" __global__ void paged_attention_##S(const float *q, const T *kc, const T *vc, float *out,   \
                                                   const u32 *row_seq, const u32 *positions,         \
                                                   const u32 *table_start, const u32 *tables, int heads, \
                                                   int kv_heads, int head_dim, int block_size, int window, \
                                                   float scale) {                                    \
        paged_attention<T>(q, kc, vc, out, row_seq, positions, table_start, tables, heads, kv_heads,  \
                           head_dim, block_size, window, scale);                                    \
    }

FOR_TYPE(float, f32)
FOR_TYPE(bf16, bf16)
FOR_TYPE(f16, f16)

#define FOR_HALF(T, S)                                                                              \
    extern "C" __global__ void cast_f32_to_##S(const float *x, T *out, u64 n) { cast_from_f32<T>(x, out, n); } \
    extern "C" __global__ void cast_##S##_to_f32(const T *x, float *out, u64 n) { cast_to_f32<T>(x, out, n); } \
    extern "C" __global__ void split_f32_to_##S(const float *x, T *out, u64 n) { split_from_f32<T>(x, out, n); }

FOR_HALF(bf16, bf16)
FOR_HALF(f16, f16)

extern "C" __global__ void gemv_small_bf16(const bf16 *w, const float *x, float *out, int m, int n, int k) {
    gemv_small<bf16>(w, x, out, m, n, k);
}
extern "C" __global__ void gemv_small_f16(const f16 *w, const float *x, float *out, int m, int n, int k) {
    gemv_small<f16>(w, x, out, m, n, k);
}
extern "C" __global__ void gemv_swiglu_bf16(const bf16 *gate, const bf16 *up, const float *x, float *out, int m, int n, int k) {
    gemv_swiglu<bf16>(gate, up, x, out, m, n, k);
}
extern "C" __global__ void gemv_swiglu_f16(const f16 *gate, const f16 *up, const float *x, float *out, int m, int n, int k) {
    gemv_swiglu<f16>(gate, up, x, out, m, n, k);
}
