// Latent selection for the device-resident SAE trainer: the k largest pre-activations of each row (TopK)
// and the k-th largest entry of a whole batch (BatchTopK's cut), by radix select on order-preserving
// 32-bit keys: 4 passes of 8 bits, each a 256-bin histogram of the entries whose higher bits match the
// prefix chosen so far. Integer histograms, so the result does not depend on thread scheduling; ties at
// the cut go to the lower column, as on the CPU.
//
// Compiled at run time by NVRTC (no CUDA toolkit needed to build saeflow): no host headers here.

typedef unsigned int u32;
typedef unsigned long long u64;

// Larger float <=> larger key (-0.0 sorts just below +0.0; NaN above +inf).
__device__ __forceinline__ u32 order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(u32 k) {
    u32 b = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(b);
}

#define BINS 256

// In `hist` (BINS counts), the bin holding the `*remaining`-th largest entry, scanning from the top;
// `*remaining` becomes its rank inside that bin. Run by one thread.
__device__ __forceinline__ u32 pick_bin(const u32* hist, u32* remaining) {
    u32 seen = 0;
    for (int b = BINS - 1; b >= 0; --b) {
        if (seen + hist[b] >= *remaining) {
            *remaining -= seen;
            return (u32)b;
        }
        seen += hist[b];
    }
    return 0; // unreachable for 1 <= remaining <= count
}

// mask[r, j] = 1 for the k largest x[r, j] of each row r (ties: lower j first), else 0.
// One block per row; x and mask are [n, m] row-major; 1 <= k <= m.
extern "C" __global__ void topk_rows_mask(const float* x, float* mask, u32 m, u32 k) {
    __shared__ u32 hist[BINS];
    __shared__ u32 prefix, remaining, bin;
    __shared__ u32 tie_base;
    __shared__ u32 scan[1024];
    const float* row = x + (u64)blockIdx.x * m;
    float* out = mask + (u64)blockIdx.x * m;
    if (threadIdx.x == 0) {
        prefix = 0;
        remaining = k;
    }
    u32 high = 0; // bits of the key fixed so far
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 b = threadIdx.x; b < BINS; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        for (u32 j = threadIdx.x; j < m; j += blockDim.x) {
            u32 key = order_key(row[j]);
            if ((key & high) == prefix) atomicAdd(&hist[(key >> shift) & (BINS - 1)], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            bin = pick_bin(hist, &remaining);
            prefix |= bin << shift;
        }
        __syncthreads();
        high |= (u32)(BINS - 1) << shift;
    }
    // prefix is now the cut's key; `remaining` entries equal to it are kept, hist[bin] entries equal it.
    const u32 cut = prefix;
    const bool all_ties = hist[bin] == remaining;
    if (all_ties) {
        for (u32 j = threadIdx.x; j < m; j += blockDim.x) {
            out[j] = order_key(row[j]) >= cut ? 1.0f : 0.0f;
        }
        return;
    }
    // Rare: more entries equal the cut than are kept; keep the first by column (a block-wide scan).
    if (threadIdx.x == 0) tie_base = 0;
    __syncthreads();
    for (u32 start = 0; start < m; start += blockDim.x) {
        u32 j = start + threadIdx.x;
        u32 key = j < m ? order_key(row[j]) : 0u;
        u32 tie = (j < m && key == cut) ? 1u : 0u;
        scan[threadIdx.x] = tie;
        __syncthreads();
        for (u32 off = 1; off < blockDim.x; off <<= 1) {
            u32 add = threadIdx.x >= off ? scan[threadIdx.x - off] : 0u;
            __syncthreads();
            scan[threadIdx.x] += add;
            __syncthreads();
        }
        if (j < m) {
            u32 rank = tie_base + scan[threadIdx.x] - tie; // ties before j
            out[j] = (key > cut || (tie && rank < remaining)) ? 1.0f : 0.0f;
        }
        __syncthreads();
        if (threadIdx.x == blockDim.x - 1) tie_base += scan[threadIdx.x];
        __syncthreads();
    }
}

// One radix pass over a whole vector for kth_largest: adds to `hist` the 8-bit digit at `shift` of every
// key whose higher bits equal state[0] (the prefix so far; state[2] is the mask of fixed bits).
extern "C" __global__ void radix_histogram(const float* x, u64 len, const u32* state, u32* hist, u32 shift) {
    __shared__ u32 local[BINS];
    for (u32 b = threadIdx.x; b < BINS; b += blockDim.x) local[b] = 0;
    __syncthreads();
    const u32 prefix = state[0], high = state[2];
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) {
        u32 key = order_key(x[i]);
        if ((key & high) == prefix) atomicAdd(&local[(key >> shift) & (BINS - 1)], 1u);
    }
    __syncthreads();
    for (u32 b = threadIdx.x; b < BINS; b += blockDim.x) {
        if (local[b]) atomicAdd(&hist[b], local[b]);
    }
}

// After a radix_histogram pass: fixes the digit at `shift` (state = {prefix, remaining, fixed-bit mask})
// and clears `hist` for the next pass. One thread. On the last pass (shift 0) writes the cut to `out`.
extern "C" __global__ void radix_pick(u32* state, u32* hist, u32 shift, float* out) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    u32 remaining = state[1];
    u32 b = pick_bin(hist, &remaining);
    state[0] |= b << shift;
    state[1] = remaining;
    state[2] |= (u32)(BINS - 1) << shift;
    for (int i = 0; i < BINS; ++i) hist[i] = 0;
    if (shift == 0) out[0] = key_float(state[0]);
}

// kth_largest's starting state: no bits fixed, the k-th largest wanted. One thread.
extern "C" __global__ void radix_init(u32* state, u32 k) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    state[0] = 0;
    state[1] = k;
    state[2] = 0;
}
