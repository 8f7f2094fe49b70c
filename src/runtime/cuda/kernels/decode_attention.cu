// Batched decode attention over per-sequence KV buffers (see src/runtime/decode_attention.rs).
//
// Every sequence b has its own K and V buffers for the layer, [nkv, cap_b, hd] row-major,
// addressed through device arrays of u64 pointers; its valid positions are 0..len_b.
//
// append_kv_rows_<T>:      grid (B, nkv), threads over hd. k_b[g, pos_b, :] = k_new[b, g, :],
//                          likewise v.
// decode_attention_<T>:    grid (nsplit, nkv * head_chunks, B), DA_THREADS threads. A block
//                          serves up to DA_GMAX query heads of one KV head's group (GQA: each K/V
//                          row is read once for them) over one split [split * chunk, +chunk) of
//                          the positions, with an online softmax in f32 over tiles of `tile`
//                          positions (32 or 64). With nsplit == 1 it writes the output rows;
//                          otherwise f32 partials (unnormalised acc, running max, sum) that
//                          decode_attention_combine_<T> merges (flash-decoding).
// decode_attention_combine_<T>: grid (nh, B), threads over hd.
//
// paged_append_kv_rows_<T>, paged_decode_attention_<T>: the same over one paged pool per layer
//                          (src/runtime/paged_kv.rs): K and V pools [blocks, nkv, bs, hd],
//                          position t of row b at block tables[starts[b] + t / bs], slot t % bs.
//                          The attention body is shared: it reads K/V rows through a source
//                          (Buffers or Paged below) and is otherwise the same kernel.
//
// Scores are computed as (scale * log2 e) q.k so that the softmax uses exp2; the output is
// rounded once to T.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define DA_THREADS 128
#define DA_WARPS (DA_THREADS / 32)
// Query heads one block serves (its accumulators live in registers).
#define DA_GMAX 8
// Head dims one thread accumulates in the PV phase: hd <= DA_THREADS * DA_DPT.
#define DA_DPT 2
// Floats the PV run reduction needs: (runs - 1) * DA_GMAX * dims, largest with 4 runs of 32.
#define DA_RED ((DA_WARPS - 1) * DA_GMAX * 32)
#define DA_LOG2E 1.4426950408889634f
#define DA_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Where the attention body reads row b's KV head g: per-row buffers [nkv, cap_b, hd].
template <typename T>
struct BufferRows {
    const T* k;
    const T* v;
    int hd;
    __device__ __forceinline__ const T* k_at(int t) const { return k + (size_t)t * hd; }
    __device__ __forceinline__ const T* v_at(int t) const { return v + (size_t)t * hd; }
};

template <typename T>
struct Buffers {
    const unsigned long long* k_ptrs;
    const unsigned long long* v_ptrs;
    const uint32_t* caps;
    const uint32_t* lens;
    int hd;
    __device__ __forceinline__ int len(int b) const { return (int)lens[b]; }
    __device__ __forceinline__ BufferRows<T> rows(int b, int g) const {
        const size_t off = (size_t)g * caps[b] * hd;
        return {reinterpret_cast<const T*>(k_ptrs[b]) + off,
                reinterpret_cast<const T*>(v_ptrs[b]) + off, hd};
    }
};

// The same from a paged pool: K, V [blocks, nkv, bs, hd]; row b's block table starts at
// tables[starts[b]].
template <typename T>
struct PagedRows {
    const T* k;
    const T* v;
    const uint32_t* table;
    size_t head_off;      // g * bs * hd
    size_t block_stride;  // nkv * bs * hd
    int bs;
    int hd;
    __device__ __forceinline__ size_t at(int t) const {
        return (size_t)table[t / bs] * block_stride + head_off + (size_t)(t % bs) * hd;
    }
    __device__ __forceinline__ const T* k_at(int t) const { return k + at(t); }
    __device__ __forceinline__ const T* v_at(int t) const { return v + at(t); }
};

template <typename T>
struct Paged {
    const T* k_pool;
    const T* v_pool;
    const uint32_t* starts;
    const uint32_t* tables;
    const uint32_t* lens;
    int nkv;
    int bs;
    int hd;
    __device__ __forceinline__ int len(int b) const { return (int)lens[b]; }
    __device__ __forceinline__ PagedRows<T> rows(int b, int g) const {
        return {k_pool, v_pool, tables + starts[b], (size_t)g * bs * hd,
                (size_t)nkv * bs * hd, bs, hd};
    }
};

template <typename T>
__device__ void append_kv_rows(const T* __restrict__ k_new, const T* __restrict__ v_new,
                               const unsigned long long* __restrict__ k_ptrs,
                               const unsigned long long* __restrict__ v_ptrs,
                               const uint32_t* __restrict__ caps,
                               const uint32_t* __restrict__ pos, int nkv, int hd) {
    const int b = blockIdx.x;
    const int g = blockIdx.y;
    const uint32_t cap = caps[b];
    const uint32_t p = pos[b];
    if (p >= cap) return;  // validated on the host; never write out of bounds
    T* k = reinterpret_cast<T*>(k_ptrs[b]);
    T* v = reinterpret_cast<T*>(v_ptrs[b]);
    const size_t dst = ((size_t)g * cap + p) * (size_t)hd;
    const size_t src = ((size_t)b * nkv + g) * (size_t)hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        k[dst + d] = k_new[src + d];
        v[dst + d] = v_new[src + d];
    }
}

// Row b's new K/V go to pool slot slots[b] (= block * bs + position within the block); the host
// checked every slot is inside the pool and that no two rows share one.
template <typename T>
__device__ void paged_append_kv_rows(const T* __restrict__ k_new, const T* __restrict__ v_new,
                                     T* __restrict__ k_pool, T* __restrict__ v_pool,
                                     const uint32_t* __restrict__ slots, int nkv, int bs,
                                     int hd) {
    const int b = blockIdx.x;
    const int g = blockIdx.y;
    const size_t slot = slots[b];
    const size_t dst = ((slot / bs * nkv + g) * bs + slot % bs) * (size_t)hd;
    const size_t src = ((size_t)b * nkv + g) * (size_t)hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        k_pool[dst + d] = k_new[src + d];
        v_pool[dst + d] = v_new[src + d];
    }
}

// Shared memory (floats): k_s [kbuf] | q_s [DA_GMAX][stride] | s_s [DA_GMAX][tile] |
// m_s, l_s, a_s [DA_GMAX], kbuf = max(tile * stride, DA_RED) (k_s holds the K tile
// [tile][stride], then the partial sums of the PV position runs). `stride` is hd rounded up to
// 4, plus 4 if that makes stride / 4 even, so that float4 reads of k_s by consecutive positions
// hit distinct banks; columns hd..stride are zero in both k_s and q_s. The host mirrors this
// size (runtime/cuda/decode_attention.rs).
template <typename T, typename Src>
__device__ void decode_attention(const T* __restrict__ q, T* __restrict__ out,
                                 float* __restrict__ part_acc, float* __restrict__ part_ml,
                                 const Src src, int nh, int hd, int group, int head_chunks,
                                 int chunk, int nsplit, int tile, int stride, float scale) {
    extern __shared__ float4 smem4[];
    float* smem = reinterpret_cast<float*>(smem4);
    float* k_s = smem;
    float* q_s = k_s + max(tile * stride, DA_RED);
    float* s_s = q_s + DA_GMAX * stride;
    float* m_s = s_s + DA_GMAX * tile;
    float* l_s = m_s + DA_GMAX;
    float* a_s = l_s + DA_GMAX;

    const int split = blockIdx.x;
    const int g = blockIdx.y / head_chunks;
    const int j0 = (blockIdx.y % head_chunks) * DA_GMAX;  // first head of the group served
    const int b = blockIdx.z;
    const int gc = min(DA_GMAX, group - j0);               // heads served, 1..=DA_GMAX
    const int h0 = g * group + j0;                          // their first query head
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const int len = src.len(b);
    const int start = split * chunk;
    const int end = min(len, start + chunk);
    const auto kv = src.rows(b, g);

    // Queries, pre-scaled, and the zero padding columns of k_s; softmax state.
    const float qscale = scale * DA_LOG2E;
    for (int i = tid; i < DA_GMAX * stride; i += DA_THREADS) {
        const int j = i / stride, d = i - j * stride;
        q_s[i] = (j < gc && d < hd) ? to_f32(q[((size_t)b * nh + h0 + j) * hd + d]) * qscale
                                    : 0.f;
    }
    for (int i = tid; i < tile * (stride - hd); i += DA_THREADS) {
        const int t = i / (stride - hd);
        k_s[t * stride + hd + (i - t * (stride - hd))] = 0.f;
    }
    if (tid < DA_GMAX) {
        m_s[tid] = DA_NEG_INF;
        l_s[tid] = 0.f;
    }

    // PV layout: threads (dg, pg): dg over dt = 32, 64 or 128 head dims (dims dg + dt * i),
    // pg over the npg = DA_THREADS / dt contiguous runs of tile / npg positions.
    const int dt = hd <= 32 ? 32 : (hd <= 64 ? 64 : DA_THREADS);
    const int npg = DA_THREADS / dt;
    const int dg = tid % dt;
    const int pg = tid / dt;
    const int run = tile / npg;
    float acc[DA_GMAX][DA_DPT];
#pragma unroll
    for (int j = 0; j < DA_GMAX; ++j)
#pragma unroll
        for (int i = 0; i < DA_DPT; ++i) acc[j][i] = 0.f;

    // QK layout: thread (tq, hg): position tq of the tile, heads hg * hpt .. + hpt.
    const int tq = tid % tile;
    const int hpt = DA_GMAX * tile / DA_THREADS;  // 4 (tile 64) or 2 (tile 32)
    const int hg = tid / tile;
    const int s4 = stride / 4;
    __syncthreads();

    for (int t0 = start; t0 < end; t0 += tile) {
        const int nt = min(tile, end - t0);  // valid positions in this tile, >= 1
        // 1. Stage the K tile (as f32).
        for (int i = tid; i < nt * hd; i += DA_THREADS) {
            const int t = i / hd, d = i - t * hd;
            k_s[t * stride + d] = to_f32(kv.k_at(t0 + t)[d]);
        }
        __syncthreads();
        // 2. Scores of valid positions; -inf for the rest.
        {
            float s[4] = {0.f, 0.f, 0.f, 0.f};
            if (tq < nt && hg * hpt < gc) {  // skip threads whose heads are all unused
                const int hn = gc - hg * hpt;  // heads of this thread that are used (>= 1)
                const float4* k4 = reinterpret_cast<const float4*>(k_s + tq * stride);
                const float4* q4 = reinterpret_cast<const float4*>(q_s);
                for (int c = 0; c < s4; ++c) {
                    const float4 kv = k4[c];
#pragma unroll
                    for (int jj = 0; jj < 4; ++jj) {
                        if (jj < hpt && jj < hn) {
                            const float4 qv = q4[(hg * hpt + jj) * s4 + c];
                            s[jj] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
                        }
                    }
                }
            }
#pragma unroll
            for (int jj = 0; jj < 4; ++jj) {
                if (jj < hpt) s_s[(hg * hpt + jj) * tile + tq] = tq < nt ? s[jj] : DA_NEG_INF;
            }
        }
        __syncthreads();
        // 3. Online softmax update, one warp per head: p = exp2(s - m_new) in place.
        for (int j = warp; j < gc; j += DA_WARPS) {
            float* sj = s_s + j * tile;
            const float m_old = m_s[j];
            const float x0 = sj[lane];
            const float x1 = lane + 32 < tile ? sj[lane + 32] : DA_NEG_INF;
            const float m_new = fmaxf(m_old, warp_max(fmaxf(x0, x1)));  // finite: nt >= 1
            const float p0 = exp2f(x0 - m_new);
            const float p1 = exp2f(x1 - m_new);
            sj[lane] = p0;
            if (lane + 32 < tile) sj[lane + 32] = p1;
            const float sum = warp_sum(p0 + p1);
            const float alpha = exp2f(m_old - m_new);  // 0 on the first tile
            __syncwarp();
            if (lane == 0) {
                m_s[j] = m_new;
                l_s[j] = l_s[j] * alpha + sum;
                a_s[j] = alpha;
            }
        }
        __syncthreads();
        // 4. acc = alpha * acc + sum_t p_t v_t over this thread's run of positions.
#pragma unroll
        for (int j = 0; j < DA_GMAX; ++j) {
            if (j < gc) {
                const float alpha = a_s[j];
#pragma unroll
                for (int i = 0; i < DA_DPT; ++i) acc[j][i] *= alpha;
            }
        }
        const int r0 = pg * run;
        const int r1 = min(r0 + run, nt);
        for (int t = r0; t < r1; ++t) {
            float v[DA_DPT];
#pragma unroll
            for (int i = 0; i < DA_DPT; ++i) {
                const int d = dg + dt * i;
                v[i] = d < hd ? to_f32(kv.v_at(t0 + t)[d]) : 0.f;
            }
#pragma unroll
            for (int j = 0; j < DA_GMAX; ++j) {
                if (j < gc) {
                    const float p = s_s[j * tile + t];
#pragma unroll
                    for (int i = 0; i < DA_DPT; ++i) acc[j][i] += p * v[i];
                }
            }
        }
        __syncthreads();
    }

    // Sum the position runs (npg > 1 only when hd <= 64) through k_s, into pg 0.
    if (npg > 1) {
        float* red = k_s;  // (npg - 1) * DA_GMAX * dt floats <= DA_RED
        if (pg > 0) {
#pragma unroll
            for (int j = 0; j < DA_GMAX; ++j)
                if (j < gc) red[((pg - 1) * DA_GMAX + j) * dt + dg] = acc[j][0];
        }
        __syncthreads();
        if (pg == 0) {
            for (int p = 1; p < npg; ++p) {
#pragma unroll
                for (int j = 0; j < DA_GMAX; ++j)
                    if (j < gc) acc[j][0] += red[((p - 1) * DA_GMAX + j) * dt + dg];
            }
        }
    }
    if (pg != 0) return;

#pragma unroll
    for (int j = 0; j < DA_GMAX; ++j) {
        if (j >= gc) continue;
        const size_t row = (size_t)b * nh + h0 + j;
        const float l = l_s[j];
        if (nsplit == 1) {
            const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
            for (int i = 0; i < DA_DPT; ++i) {
                const int d = dg + dt * i;
                if (d < hd) out[row * hd + d] = from_f32<T>(acc[j][i] * inv);
            }
        } else {
            const size_t slot = row * nsplit + split;
#pragma unroll
            for (int i = 0; i < DA_DPT; ++i) {
                const int d = dg + dt * i;
                if (d < hd) part_acc[slot * hd + d] = acc[j][i];
            }
            if (dg == 0) {
                part_ml[slot * 2] = m_s[j];
                part_ml[slot * 2 + 1] = l;
            }
        }
    }
}

// Merges the nsplit partials of each (b, h): weights exp2(m_s - M), M the largest m_s; splits
// past the row's length hold m = -inf, l = 0 and weigh nothing.
template <typename T>
__device__ void decode_attention_combine(const float* __restrict__ part_acc,
                                         const float* __restrict__ part_ml, T* __restrict__ out,
                                         int nh, int hd, int nsplit) {
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const size_t row = (size_t)b * nh + h;
    const float* ml = part_ml + row * nsplit * 2;
    float m = DA_NEG_INF;
    for (int s = 0; s < nsplit; ++s) m = fmaxf(m, ml[2 * s]);
    float l = 0.f;
    for (int s = 0; s < nsplit; ++s) {
        if (ml[2 * s + 1] > 0.f) l += exp2f(ml[2 * s] - m) * ml[2 * s + 1];
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float* acc = part_acc + row * nsplit * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.f;
        for (int s = 0; s < nsplit; ++s) {
            if (ml[2 * s + 1] > 0.f) o += exp2f(ml[2 * s] - m) * acc[(size_t)s * hd + d];
        }
        out[row * hd + d] = from_f32<T>(o * inv);
    }
}

#define DA_INSTANTIATE(SUFFIX, T)                                                               \
    extern "C" __global__ void append_kv_rows_##SUFFIX(                                        \
        const T* k_new, const T* v_new, const unsigned long long* k_ptrs,                     \
        const unsigned long long* v_ptrs, const uint32_t* caps, const uint32_t* pos, int nkv, \
        int hd) {                                                                               \
        append_kv_rows<T>(k_new, v_new, k_ptrs, v_ptrs, caps, pos, nkv, hd);                   \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(DA_THREADS) decode_attention_##SUFFIX(       \
        const T* q, T* out, float* part_acc, float* part_ml, const unsigned long long* k_ptrs, \
        const unsigned long long* v_ptrs, const uint32_t* caps, const uint32_t* lens, int nh,  \
        int nkv, int hd, int group, int head_chunks, int chunk, int nsplit, int tile,          \
        int stride, float scale) {                                                              \
        const Buffers<T> src{k_ptrs, v_ptrs, caps, lens, hd};                                  \
        decode_attention<T, Buffers<T>>(q, out, part_acc, part_ml, src, nh, hd, group,        \
                                        head_chunks, chunk, nsplit, tile, stride, scale);      \
    }                                                                                           \
    extern "C" __global__ void paged_append_kv_rows_##SUFFIX(                                  \
        const T* k_new, const T* v_new, T* k_pool, T* v_pool, const uint32_t* slots, int nkv,  \
        int bs, int hd) {                                                                       \
        paged_append_kv_rows<T>(k_new, v_new, k_pool, v_pool, slots, nkv, bs, hd);             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(DA_THREADS) paged_decode_attention_##SUFFIX( \
        const T* q, T* out, float* part_acc, float* part_ml, const T* k_pool, const T* v_pool, \
        const uint32_t* starts, const uint32_t* tables, const uint32_t* lens, int nh, int nkv, \
        int hd, int group, int head_chunks, int chunk, int nsplit, int tile, int stride,       \
        int bs, float scale) {                                                                  \
        const Paged<T> src{k_pool, v_pool, starts, tables, lens, nkv, bs, hd};                 \
        decode_attention<T, Paged<T>>(q, out, part_acc, part_ml, src, nh, hd, group,          \
                                      head_chunks, chunk, nsplit, tile, stride, scale);        \
    }                                                                                           \
    extern "C" __global__ void decode_attention_combine_##SUFFIX(                              \
        const float* part_acc, const float* part_ml, T* out, int nh, int hd, int nsplit) {     \
        decode_attention_combine<T>(part_acc, part_ml, out, nh, hd, nsplit);                   \
    }

DA_INSTANTIATE(f32, float)
DA_INSTANTIATE(bf16, __nv_bfloat16)
DA_INSTANTIATE(f16, __half)
