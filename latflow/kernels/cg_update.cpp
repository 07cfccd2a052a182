// Fused vector updates of batched conjugate gradients on the CPU (latflow.fermions.solvers.cg).
//
// Fields are B systems of m real numbers each (a complex field is viewed as its interleaved (re, im) pairs:
// m = 2 * complex components), float or double. Per-system scalars are double; sums are accumulated in double.
//
//   latflow_cg_re_dot:    out[i] = sum_k a[i, k] b[i, k]                       (Re <a, b> for complex fields)
//   latflow_cg_update:    x[i] += alpha[i] p[i];  r[i] -= alpha[i] ap[i];  rr[i] = |r[i]|^2    (one pass)
//   latflow_cg_direction: p[i] = r[i] + beta[i] p[i]
//
// Systems are independent; the sums do not depend on the number of threads.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
double dot_range(const T* a, const T* b, int64_t lo, int64_t hi) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t k = lo;
    for (; k + 4 <= hi; k += 4) {
        s0 += double(a[k]) * double(b[k]);
        s1 += double(a[k + 1]) * double(b[k + 1]);
        s2 += double(a[k + 2]) * double(b[k + 2]);
        s3 += double(a[k + 3]) * double(b[k + 3]);
    }
    for (; k < hi; ++k) s0 += double(a[k]) * double(b[k]);
    return (s0 + s1) + (s2 + s3);
}

template <typename T>
double update_range(T* x, const T* p, T* r, const T* ap, T alpha, int64_t lo, int64_t hi) {
    double s0 = 0, s1 = 0;
    int64_t k = lo;
    for (; k + 2 <= hi; k += 2) {
        x[k] += alpha * p[k];
        x[k + 1] += alpha * p[k + 1];
        T r0 = r[k] - alpha * ap[k];
        T r1 = r[k + 1] - alpha * ap[k + 1];
        r[k] = r0;
        r[k + 1] = r1;
        s0 += double(r0) * double(r0);
        s1 += double(r1) * double(r1);
    }
    for (; k < hi; ++k) {
        x[k] += alpha * p[k];
        T r0 = r[k] - alpha * ap[k];
        r[k] = r0;
        s0 += double(r0) * double(r0);
    }
    return s0 + s1;
}

// Sums run over fixed chunks of CHUNK reals (in parallel over all systems and chunks), then the chunks' partial sums
// are added in order: the result does not depend on the number of threads.
constexpr int64_t CHUNK = 16384;

inline int64_t n_chunks(int64_t m) { return m > 0 ? (m + CHUNK - 1) / CHUNK : 1; }

// out[i] = sum over c of partial[i * nc + c], in order
inline void sum_chunks(const std::vector<double>& partial, int64_t batch, int64_t nc, double* out) {
    for (int64_t i = 0; i < batch; ++i) {
        double s = 0;
        for (int64_t c = 0; c < nc; ++c) s += partial[i * nc + c];
        out[i] = s;
    }
}

// out[i] = sum over the chunks of system i of part(i, lo, hi), each chunk a thread's work
template <typename F>
void chunked_sums(int64_t batch, int64_t m, double* out, int n_threads, F part) {
    const int64_t nc = n_chunks(m);
    std::vector<double> partial(static_cast<std::size_t>(batch * nc));
#pragma omp parallel for num_threads(n_threads) schedule(static) if (n_threads > 1 && batch * m > 65536)
    for (int64_t t = 0; t < batch * nc; ++t) {
        const int64_t i = t / nc, c = t % nc;
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < m ? lo + CHUNK : m;
        partial[t] = part(i, lo, hi);
    }
    sum_chunks(partial, batch, nc, out);
}

template <typename T>
void re_dot(int64_t batch, int64_t m, const T* a, const T* b, double* out, int n_threads) {
    chunked_sums(batch, m, out, n_threads,
                 [=](int64_t i, int64_t lo, int64_t hi) { return dot_range(a + i * m, b + i * m, lo, hi); });
}

template <typename T>
void update(int64_t batch, int64_t m, const double* alpha, T* x, const T* p, T* r, const T* ap, double* rr,
            int n_threads) {
    chunked_sums(batch, m, rr, n_threads, [=](int64_t i, int64_t lo, int64_t hi) {
        const int64_t o = i * m;
        return update_range(x + o, p + o, r + o, ap + o, T(alpha[i]), lo, hi);
    });
}

template <typename T>
void direction(int64_t batch, int64_t m, const double* beta, const T* r, T* p, int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static) collapse(2) if (n_threads > 1 && batch * m > 65536)
    for (int64_t j = 0; j < batch; ++j)
        for (int64_t k = 0; k < m; ++k) p[j * m + k] = r[j * m + k] + T(beta[j]) * p[j * m + k];
}

inline int threads(int n) { return n < 1 ? 1 : (n > 64 ? 64 : n); }

}  // namespace

extern "C" {

// real_bytes: 4 (float) or 8 (double). Return 0 on success, 1 for an unsupported real type.
int latflow_cg_re_dot(int real_bytes, int64_t batch, int64_t m, const void* a, const void* b, double* out,
                      int n_threads) {
    if (real_bytes == 8)
        re_dot(batch, m, static_cast<const double*>(a), static_cast<const double*>(b), out, threads(n_threads));
    else if (real_bytes == 4)
        re_dot(batch, m, static_cast<const float*>(a), static_cast<const float*>(b), out, threads(n_threads));
    else
        return 1;
    return 0;
}

int latflow_cg_update(int real_bytes, int64_t batch, int64_t m, const double* alpha, void* x, const void* p, void* r,
                      const void* ap, double* rr, int n_threads) {
    if (real_bytes == 8)
        update(batch, m, alpha, static_cast<double*>(x), static_cast<const double*>(p), static_cast<double*>(r),
               static_cast<const double*>(ap), rr, threads(n_threads));
    else if (real_bytes == 4)
        update(batch, m, alpha, static_cast<float*>(x), static_cast<const float*>(p), static_cast<float*>(r),
               static_cast<const float*>(ap), rr, threads(n_threads));
    else
        return 1;
    return 0;
}

int latflow_cg_direction(int real_bytes, int64_t batch, int64_t m, const double* beta, const void* r, void* p,
                         int n_threads) {
    if (real_bytes == 8)
        direction(batch, m, beta, static_cast<const double*>(r), static_cast<double*>(p), threads(n_threads));
    else if (real_bytes == 4)
        direction(batch, m, beta, static_cast<const float*>(r), static_cast<float*>(p), threads(n_threads));
    else
        return 1;
    return 0;
}

}  // extern "C"
