// Runs saeflow's CUDA kernels under cuda_on_cpu.h against plain C++ references (sorts, f64 sums), with the
// launch shapes the Rust side uses (src/kernels/cuda/{topk,sparse}.rs). Prints one line per case and exits
// non-zero on the first mismatch. Built and run by tests/cuda_emulated.rs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

#include "cuda_on_cpu.h"

#include KERNELS_TOPK
#include KERNELS_SPARSE

namespace {

uint64_t rng = 0x9e3779b97f4a7c15ull;

// Uniform in [-0.5, 0.5).
float uniform() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return float(rng >> 40) / float(1 << 24) - 0.5f;
}

// Small integers (many ties; never -0.0) or spread values.
std::vector<float> values(size_t len, bool ties) {
    std::vector<float> v(len);
    for (float& x : v) x = ties ? float(int((uniform() + 0.5f) * 9.0f) - 4) : uniform();
    return v;
}

[[noreturn]] void fail(const std::string& what) {
    std::fprintf(stderr, "MISMATCH: %s\n", what.c_str());
    std::exit(1);
}

// --- topk_rows_mask: launched as in topk.rs (one block of 512 per row).
void topk_rows(unsigned n, unsigned m, unsigned k, bool ties) {
    std::vector<float> x = values(size_t(n) * m, ties), mask(size_t(n) * m, -1.0f);
    launch(topk_rows_mask, n, 512, (const float*)x.data(), mask.data(), m, k);
    for (unsigned r = 0; r < n; ++r) {
        const float* row = &x[size_t(r) * m];
        std::vector<unsigned> order(m);
        std::iota(order.begin(), order.end(), 0u);
        std::stable_sort(order.begin(), order.end(), [&](unsigned a, unsigned b) { return row[a] > row[b]; });
        std::vector<float> expected(m, 0.0f);
        for (unsigned i = 0; i < k; ++i) expected[order[i]] = 1.0f;
        for (unsigned j = 0; j < m; ++j) {
            if (mask[size_t(r) * m + j] != expected[j]) {
                fail("topk_rows_mask n " + std::to_string(n) + " m " + std::to_string(m) + " k " +
                     std::to_string(k) + ": row " + std::to_string(r) + " column " + std::to_string(j));
            }
        }
    }
    std::printf("topk_rows_mask n %u m %u k %u ties %d: ok\n", n, m, k, int(ties));
}

// --- kth_largest: the host sequence of topk.rs (init, then 4 × histogram + pick).
void kth(size_t len, unsigned k, bool ties) {
    std::vector<float> x = values(len, ties);
    unsigned state[3] = {0, 0, 0}, hist[256] = {};
    float out = 0.0f;
    launch(radix_init, 1, 1, state, k);
    const unsigned blocks = std::clamp<unsigned>(unsigned((len + 511) / 512), 1u, 1024u);
    for (unsigned shift : {24u, 16u, 8u, 0u}) {
        launch(radix_histogram, blocks, 512, (const float*)x.data(), (u64)len, (const unsigned*)state, hist,
               shift);
        launch(radix_pick, 1, 1, state, hist, shift, &out);
    }
    std::vector<float> sorted = x;
    std::sort(sorted.begin(), sorted.end(), std::greater<float>());
    if (out != sorted[k - 1]) {
        fail("kth_largest len " + std::to_string(len) + " k " + std::to_string(k) + ": " + std::to_string(out) +
             " vs " + std::to_string(sorted[k - 1]));
    }
    std::printf("kth_largest len %zu k %u ties %d: ok\n", len, k, int(ties));
}

// A [rows, cols] matrix: row 0 full (past the kernels' shared list), row 1 empty, the others with about
// `per_row` nonzeros.
std::vector<float> sparse(unsigned rows, unsigned cols, unsigned per_row) {
    std::vector<float> s(size_t(rows) * cols, 0.0f);
    for (unsigned r = 0; r < rows; ++r) {
        for (unsigned j = 0; j < cols; ++j) {
            bool keep = r == 0 || (r != 1 && (uniform() + 0.5f) * cols < per_row);
            if (keep) s[size_t(r) * cols + j] = uniform() + 0.75f;
        }
    }
    return s;
}

void close_or_fail(const std::vector<double>& expected, const std::vector<float>& got, const std::string& what) {
    double scale = 1e-30;
    for (double e : expected) scale = std::max(scale, std::abs(e));
    for (size_t i = 0; i < expected.size(); ++i) {
        if (!(std::abs(expected[i] - got[i]) <= 1e-5 * scale)) {
            fail(what + ": element " + std::to_string(i) + " " + std::to_string(got[i]) + " vs " +
                 std::to_string(expected[i]));
        }
    }
}

// --- sparse_rows_matmul and masked_row_dots: one block of THREADS per row, as in sparse.rs.
void sparse_products(unsigned rows, unsigned cols, unsigned d, unsigned per_row) {
    const std::string shape = std::to_string(rows) + "x" + std::to_string(cols) + " d " + std::to_string(d);
    std::vector<float> s = sparse(rows, cols, per_row), b = values(size_t(cols) * d, false),
                       a = values(size_t(rows) * d, false);
    std::vector<float> out(size_t(rows) * d, NAN);
    launch(sparse_rows_matmul, rows, THREADS, (const float*)s.data(), (const float*)b.data(), out.data(), cols, d);
    std::vector<double> expected(size_t(rows) * d, 0.0);
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned j = 0; j < cols; ++j)
            for (unsigned c = 0; c < d; ++c)
                expected[size_t(r) * d + c] += double(s[size_t(r) * cols + j]) * b[size_t(j) * d + c];
    close_or_fail(expected, out, "sparse_rows_matmul " + shape);

    std::vector<float> dots(size_t(rows) * cols, 0.0f);  // zeroed, as the launcher's alloc_zeros
    launch(masked_row_dots, rows, THREADS, (const float*)a.data(), (const float*)b.data(), (const float*)s.data(),
           dots.data(), cols, d);
    std::vector<double> want(size_t(rows) * cols, 0.0);
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned j = 0; j < cols; ++j) {
            const float m = s[size_t(r) * cols + j];
            if (m == 0.0f) continue;
            double dot = 0.0;
            for (unsigned c = 0; c < d; ++c) dot += double(a[size_t(r) * d + c]) * b[size_t(j) * d + c];
            want[size_t(r) * cols + j] = m * dot;
        }
    close_or_fail(want, dots, "masked_row_dots " + shape);
    std::printf("sparse_rows_matmul, masked_row_dots %s per row %u: ok\n", shape.c_str(), per_row);
}

}  // namespace

int main() {
    std::setvbuf(stdout, nullptr, _IONBF, 0);  // progress lines and a mismatch in the order they happen
    topk_rows(3, 7, 1, false);
    topk_rows(4, 1000, 20, false);
    topk_rows(5, 3000, 64, true);  // ties at the cut: lower columns first
    topk_rows(2, 600, 600, true);  // k = m
    kth(1000, 1, false);
    kth(1000, 1000, false);
    kth(20000, 777, true);
    kth(30000, 12345, false);
    sparse_products(3, 5, 3, 2);
    sparse_products(6, 700, 300, 16);
    sparse_products(5, 3000, 40, 300);  // row 0 (3000 nonzeros) spends its list twice
    return 0;
}
