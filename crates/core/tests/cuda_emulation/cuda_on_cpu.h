// Just enough of CUDA's execution model to run saeflow's kernels (`src/kernels/cuda/*.cu`) on the CPU, so
// their logic is tested on machines without a GPU: one OS thread per CUDA thread, blocks one after another
// (so `__shared__` can be a function-local `static`), `__syncthreads` a barrier of the block's threads.
// What it cannot show: performance, races the barrier hides, warp-level behaviour (the kernels use none).
#pragma once

#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Block {
    std::barrier<>* barrier;
    std::atomic<int> count{0};
};
inline thread_local Block* block = nullptr;
}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::block->barrier->arrive_and_wait(); }

// Every thread adds its vote, all read the total, every thread takes its vote back.
inline int __syncthreads_count(int predicate) {
    emu::Block* b = emu::block;
    const int vote = predicate ? 1 : 0;
    b->count.fetch_add(vote);
    b->barrier->arrive_and_wait();
    const int total = b->count.load();
    b->barrier->arrive_and_wait();
    b->count.fetch_sub(vote);
    b->barrier->arrive_and_wait();
    return total;
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
    return std::atomic_ref<unsigned>(*address).fetch_add(value);
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// kernel<<<grid, block>>>(args...), one-dimensional, run to completion.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, Args... args) {
    gridDim = dim3{grid};
    blockDim = dim3{block};
    for (unsigned bx = 0; bx < grid; ++bx) {
        std::barrier<> barrier(block);
        emu::Block state{&barrier};
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (unsigned tx = 0; tx < block; ++tx) {
            threads.emplace_back([&, tx] {
                threadIdx = dim3{tx};
                blockIdx = dim3{bx};
                emu::block = &state;
                kernel(args...);
                barrier.arrive_and_drop();  // a thread that returned no longer holds the others back
            });
        }
        for (std::thread& t : threads) t.join();
    }
}
