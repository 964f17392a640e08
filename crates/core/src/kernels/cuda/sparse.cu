// Products with a sparse operand for the device-resident SAE trainer: TopK keeps k of d_sae latents per
// token, so the decoder, its gradient and the encoder's gradient touch k rows per token, not d_sae. The
// sparse operand stays a dense [rows, cols] tensor (what the candle-op path uses too); each block compacts
// one row's nonzeros, in column order, into shared memory and then works only on those.
//
// Deterministic: every output element is summed by one thread in column order, never by atomics.
// Compiled at run time by NVRTC (no CUDA toolkit needed to build saeflow): no host headers here.

typedef unsigned int u32;
typedef unsigned long long u64;

// Nonzeros a block holds before it must spend them.
#define LIST 2048
// Threads per block; the launcher uses this many.
#define THREADS 256

// Appends the nonzeros of the block's row `row` [cols] to (list_col, list_val) in column order, calling
// `spend(count)` whenever the list could overflow and once at the end (count may be 0). Every thread of the
// block must call this; `spend` is called by all of them.
template <typename Spend>
__device__ __forceinline__ void for_nonzeros(const float* row, u32 cols, u32* list_col, float* list_val,
                                             u32* scan, u32* count, Spend spend) {
    if (threadIdx.x == 0) *count = 0;
    __syncthreads();
    for (u32 start = 0; start < cols; start += THREADS) {
        const u32 j = start + threadIdx.x;
        const float v = j < cols ? row[j] : 0.0f;
        const u32 flag = v != 0.0f ? 1u : 0u; // NaN counts as nonzero: it reaches the output
        if (__syncthreads_count(flag) == 0) continue; // most tiles of a TopK row: nothing to keep
        // Inclusive scan of the flags: each kept entry's place among this tile's.
        scan[threadIdx.x] = flag;
        __syncthreads();
        for (u32 off = 1; off < THREADS; off <<= 1) {
            const u32 add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0u;
            __syncthreads();
            scan[threadIdx.x] += add;
            __syncthreads();
        }
        const u32 tile = scan[THREADS - 1];
        if (*count + tile > LIST) {
            spend(*count);
            __syncthreads();
            if (threadIdx.x == 0) *count = 0;
            __syncthreads();
        }
        if (flag) {
            const u32 at = *count + scan[threadIdx.x] - 1;
            list_col[at] = j;
            list_val[at] = v;
        }
        __syncthreads();
        if (threadIdx.x == 0) *count += tile;
        __syncthreads();
    }
    spend(*count);
    __syncthreads();
}

// out[r, :] = Σ_j s[r, j] · b[j, :] for s [rows, cols] (mostly zeros), b [cols, d], out [rows, d].
// One block of THREADS per row r; thread t owns the output columns t, t + THREADS, …
extern "C" __global__ void sparse_rows_matmul(const float* s, const float* b, float* out, u32 cols, u32 d) {
    __shared__ u32 list_col[LIST];
    __shared__ float list_val[LIST];
    __shared__ u32 scan[THREADS];
    __shared__ u32 count;
    const u64 r = blockIdx.x;
    float* o = out + r * d;
    bool partial = false; // whether `o` holds a sum from an earlier spend (same in every thread)
    for_nonzeros(s + r * cols, cols, list_col, list_val, scan, &count, [&](u32 n) {
        if (n == 0 && partial) return;
        for (u32 c = threadIdx.x; c < d; c += THREADS) {
            float acc = partial ? o[c] : 0.0f;
            for (u32 e = 0; e < n; ++e) acc += list_val[e] * b[(u64)list_col[e] * d + c];
            o[c] = acc;
        }
        partial = true;
    });
}

// out[r, j] = mask[r, j] · (a[r, :] · b[j, :]) where mask[r, j] != 0; out must be zeroed by the caller.
// a [rows, d], b [cols, d], mask and out [rows, cols]. One block of THREADS per row r; each kept (r, j) is
// one thread's dot product, summed over d in order.
extern "C" __global__ void masked_row_dots(const float* a, const float* b, const float* mask, float* out,
                                           u32 cols, u32 d) {
    __shared__ u32 list_col[LIST];
    __shared__ float list_val[LIST];
    __shared__ u32 scan[THREADS];
    __shared__ u32 count;
    const u64 r = blockIdx.x;
    const float* x = a + r * d;
    float* o = out + r * cols;
    for_nonzeros(mask + r * cols, cols, list_col, list_val, scan, &count, [&](u32 n) {
        for (u32 e = threadIdx.x; e < n; e += THREADS) {
            const u32 j = list_col[e];
            const float* y = b + (u64)j * d;
            float acc = 0.0f;
            for (u32 c = 0; c < d; ++c) acc += x[c] * y[c];
            o[j] = list_val[e] * acc;
        }
    });
}
