// Fused Wilson hopping term on site-index tables (see latflow/fermions/hopping.py).
//
//   out[b, i] = base[b, i] + scale * sum_k recon_k ( V_k(i) proj_k(src[b, j_k(i)]) )
//
// over the half-spinor terms k of every direction mu and orientation: a forward term uses
// V = U_mu(x_i) and j = fwd[i, mu]; a backward term uses V = U_mu(x_i - mu)^dagger (the adjoint is
// taken here, so only the forward links are read) and j = bwd[i, mu]. proj_k is a combination of
// one or two spin components of the source, recon_k adds the hopped half-spinor to one or two spin
// components of the result; their coefficients come in as a small table.
//
// Layouts (row-major, complex numbers as interleaved (re, im) pairs of T = float or double):
//   src  [B, n_src, Ns, N]    base, out  [B, n_out, Ns, N]    links [B, d, V, N, N]
//   out_site [n_out]: full-lattice flat index of output site i (index of its forward links)
//   fwd, bwd [n_out, d]: index of x_i + mu, x_i - mu in the source packing
//   bwd_link [n_out, d]: full-lattice flat index of x_i - mu (index of the backward link)
//   term_int [K, 8]: mu, backward, n_proj, p0, p1, n_recon, r0, r1
//   term_coef [K, 8]: proj coefficients (p0 re, im, p1 re, im), recon coefficients (r0 re, im, r1 re, im)
// Terms must come grouped by (mu, backward) so that consecutive terms share source and link.
//
// Two implementations: a generic one that follows the tables at run time (any d, Ns = 2 or 4), and
// a fast one for the basis of latflow.fermions.gamma in d = 2 and 4, with the terms known at
// compile time and vectorised in pairs; the fast one runs only when the tables equal its terms.
// Sites are distributed over OpenMP threads (n_threads per call); each output site is written by
// one thread with a fixed order of operations, so results do not depend on the thread count.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace {

constexpr int kMaxTerms = 64;

template <typename T>
struct Cx {
    T re, im;
};

template <typename T>
inline Cx<T> cmul(Cx<T> a, Cx<T> b) {
    return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re};
}

// conj(a) * b
template <typename T>
inline Cx<T> cjmul(Cx<T> a, Cx<T> b) {
    return {a.re * b.re + a.im * b.im, a.re * b.im - a.im * b.re};
}

constexpr int kMaxSpin = 4;

template <typename T>
struct Term {
    int mu, backward, np, p0, p1, nr, r0, r1;
    Cx<T> cp0, cp1, cr0, cr1;
    bool unit_p0, unit_r0;  // cp0 == 1, cr0 == 1 (the usual case: no multiplication)
};

// acc[r][.] += scale * y with a runtime r: a switch over compile-time indices keeps acc in registers.
template <typename T, int N, int NS>
inline void add_spin(Cx<T> (&acc)[NS][N], int r, const Cx<T> (&y)[N]) {
    switch (r) {
#define LATFLOW_ADD_CASE(R)                   \
    case R:                                   \
        if constexpr (R < NS) {               \
            for (int a = 0; a < N; ++a) {     \
                acc[R][a].re += y[a].re;      \
                acc[R][a].im += y[a].im;      \
            }                                 \
        }                                     \
        break;
        LATFLOW_ADD_CASE(0)
        LATFLOW_ADD_CASE(1)
        LATFLOW_ADD_CASE(2)
        LATFLOW_ADD_CASE(3)
#undef LATFLOW_ADD_CASE
        default:
            break;
    }
}

// One (mu, orientation) group of terms shares its source site and link. The projection reads the
// source spins by runtime index; the reconstruction adds to register accumulators via add_spin.
template <typename T, int N, int NS>
inline void hop_site(int d, int64_t i, const int32_t* out_site, const int32_t* fwd, const int32_t* bwd,
                     const int32_t* bwd_link, int n_groups, const int* group_start, const Term<T>* terms,
                     const Cx<T>* links_b, int64_t volume, const Cx<T>* src_b, Cx<T> (&acc)[NS][N]) {
    for (int g = 0; g < n_groups; ++g) {
        const Term<T>& first = terms[group_start[g]];
        const int mu = first.mu;
        const bool backward = first.backward != 0;
        const int64_t j = backward ? bwd[i * d + mu] : fwd[i * d + mu];
        const int64_t lx = backward ? bwd_link[i * d + mu] : out_site[i];
        const Cx<T>* s = src_b + j * NS * N;
        const Cx<T>* u = links_b + (mu * volume + lx) * N * N;
        for (int k = group_start[g]; k < group_start[g + 1]; ++k) {
            const Term<T>& t = terms[k];
            Cx<T> h[N];
            for (int c = 0; c < N; ++c) {
                h[c] = t.unit_p0 ? s[t.p0 * N + c] : cmul(t.cp0, s[t.p0 * N + c]);
                if (t.np == 2) {
                    const Cx<T> z = cmul(t.cp1, s[t.p1 * N + c]);
                    h[c].re += z.re;
                    h[c].im += z.im;
                }
            }
            Cx<T> y[N];
            for (int a = 0; a < N; ++a) {
                Cx<T> v = backward ? cjmul(u[a], h[0]) : cmul(u[a * N], h[0]);
                for (int c = 1; c < N; ++c) {
                    const Cx<T> z = backward ? cjmul(u[c * N + a], h[c]) : cmul(u[a * N + c], h[c]);
                    v.re += z.re;
                    v.im += z.im;
                }
                y[a] = v;
            }
            Cx<T> z[N];
            for (int a = 0; a < N; ++a) z[a] = t.unit_r0 ? y[a] : cmul(t.cr0, y[a]);
            add_spin<T, N, NS>(acc, t.r0, z);
            if (t.nr == 2) {
                for (int a = 0; a < N; ++a) z[a] = cmul(t.cr1, y[a]);
                add_spin<T, N, NS>(acc, t.r1, z);
            }
        }
    }
}

template <typename T, int N, int NS>
void hop_impl(int d, int64_t batch, int64_t n_out, int64_t n_src, int64_t volume, const int32_t* out_site,
              const int32_t* fwd, const int32_t* bwd, const int32_t* bwd_link, int n_groups, const int* group_start,
              const Term<T>* terms, const T* links_r, const T* src_r, const T* base_r, T* out_r, T scale,
              int n_threads) {
    const auto* links = reinterpret_cast<const Cx<T>*>(links_r);
    const auto* src = reinterpret_cast<const Cx<T>*>(src_r);
    const auto* base = reinterpret_cast<const Cx<T>*>(base_r);
    auto* out = reinterpret_cast<Cx<T>*>(out_r);
#pragma omp parallel for collapse(2) schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < n_out; ++i) {
            Cx<T> acc[NS][N];
            for (int sp = 0; sp < NS; ++sp)
                for (int c = 0; c < N; ++c) acc[sp][c] = {T(0), T(0)};
            hop_site<T, N, NS>(d, i, out_site, fwd, bwd, bwd_link, n_groups, group_start, terms,
                               links + b * d * volume * N * N, volume, src + b * n_src * NS * N, acc);
            const int64_t bi = b * n_out + i;
            Cx<T>* o = out + bi * NS * N;
            if (base != nullptr) {
                const Cx<T>* bs = base + bi * NS * N;
                for (int sp = 0; sp < NS; ++sp)
                    for (int c = 0; c < N; ++c)
                        o[sp * N + c] = {bs[sp * N + c].re + scale * acc[sp][c].re,
                                         bs[sp * N + c].im + scale * acc[sp][c].im};
            } else {
                for (int sp = 0; sp < NS; ++sp)
                    for (int c = 0; c < N; ++c) o[sp * N + c] = {scale * acc[sp][c].re, scale * acc[sp][c].im};
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fast path: the half-spinor terms of latflow.fermions.gamma's basis in d = 2 and d = 4, known at
// compile time (every coefficient is 1 or a power of i, so the spin algebra folds into additions,
// subtractions and swaps). Used only when the runtime term table equals one of these exactly (for
// H, or for H^dagger, which flips the sign of every second coefficient); otherwise the generic
// path above runs.
struct Spec {
    int mu, backward, p0, p1, k1, kr;  // proj s[p0] + i^k1 s[p1]; recon acc[p0] += y, acc[p1] += i^kr y
};

constexpr Spec kSpec2[4] = {{0, 0, 0, 1, 2, 2}, {0, 1, 0, 1, 0, 0}, {1, 0, 0, 1, 1, 3}, {1, 1, 0, 1, 3, 1}};
constexpr Spec kSpec4[16] = {{0, 0, 0, 2, 2, 2}, {0, 0, 1, 3, 2, 2}, {0, 1, 0, 2, 0, 0}, {0, 1, 1, 3, 0, 0},
                             {1, 0, 0, 3, 1, 3}, {1, 0, 1, 2, 1, 3}, {1, 1, 0, 3, 3, 1}, {1, 1, 1, 2, 3, 1},
                             {2, 0, 0, 3, 0, 0}, {2, 0, 1, 2, 2, 2}, {2, 1, 0, 3, 2, 2}, {2, 1, 1, 2, 0, 0},
                             {3, 0, 0, 2, 1, 3}, {3, 0, 1, 3, 3, 1}, {3, 1, 0, 2, 3, 1}, {3, 1, 1, 3, 1, 3}};

template <int D>
constexpr const Spec& spec(int k) {
    if constexpr (D == 2) {
        return kSpec2[k];
    } else {
        return kSpec4[k];
    }
}

// The fast path runs paired lanes: consecutive terms (2m, 2m + 1) of the spec run in the two
// complex lanes of one 4-wide vector [re_a, im_a, re_b, im_b] (d = 2: the forward and backward hop
// of one direction; d = 4: the two half-spinors of one hop, which share their link). Accumulators
// are vectors indexed by the pair of spins the two lanes add to; they are summed into the result
// at the end. GCC/Clang vector extensions: SIMD on any target, no intrinsics.
template <typename T>
struct Vec;
template <>
struct Vec<double> {
    typedef double type __attribute__((vector_size(32)));
    typedef int64_t index __attribute__((vector_size(32)));
};
template <>
struct Vec<float> {
    typedef float type __attribute__((vector_size(16)));
    typedef int32_t index __attribute__((vector_size(16)));
};
template <typename T>
using V4 = typename Vec<T>::type;
template <typename T>
using I4 = typename Vec<T>::index;
template <typename V>
using Scalar = std::decay_t<decltype(V{}[0])>;

template <typename V>
inline V swap_reim(V v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 1, 0, 3, 2);
#else
    return __builtin_shuffle(v, I4<Scalar<V>>{1, 0, 3, 2});
#endif
}

template <typename T>
inline V4<T> pair(const Cx<T>* a, const Cx<T>* b) {
    // whole-complex loads into the two lanes (element-wise construction is slow, above all for float)
    typedef double D2 __attribute__((vector_size(16)));
    if constexpr (sizeof(T) == 8) {
        D2 lo, hi;
        std::memcpy(&lo, a, 16);
        std::memcpy(&hi, b, 16);
        return __builtin_shufflevector(lo, hi, 0, 1, 2, 3);
    } else {
        double da, db;
        std::memcpy(&da, a, 8);
        std::memcpy(&db, b, 8);
        return (V4<T>)D2{da, db};
    }
}

template <typename V>
inline V dup_re(V v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 0, 0, 2, 2);
#else
    return __builtin_shuffle(v, I4<Scalar<V>>{0, 0, 2, 2});
#endif
}

template <typename V>
inline V dup_im(V v) {
#if defined(__clang__)
    return __builtin_shufflevector(v, v, 1, 1, 3, 3);
#else
    return __builtin_shuffle(v, I4<Scalar<V>>{1, 1, 3, 3});
#endif
}

// lane-wise i^KA (lane a), i^KB (lane b)
template <int KA, int KB, typename V>
inline V ipow2(V z) {
    using T = Scalar<V>;
    constexpr int ka = ((KA % 4) + 4) % 4, kb = ((KB % 4) + 4) % 4;
    if constexpr (ka == kb) {
        if constexpr (ka == 0) return z;
        if constexpr (ka == 2) return -z;
        if constexpr (ka == 1) return swap_reim(z) * V{-1, 1, -1, 1};
        return swap_reim(z) * V{1, -1, 1, -1};
    } else {
        constexpr T a0 = ka == 0 ? 1 : (ka == 2 ? -1 : 0), b0 = kb == 0 ? 1 : (kb == 2 ? -1 : 0);
        constexpr T a1 = ka == 1 ? -1 : (ka == 3 ? 1 : 0), b1 = kb == 1 ? -1 : (kb == 3 ? 1 : 0);
        return z * V{a0, a0, b0, b0} + swap_reim(z) * V{a1, -a1, b1, -b1};
    }
}

template <int D>
constexpr bool spin_pair_used(int x, int y) {
    for (int m = 0; m < (D == 2 ? 2 : 8); ++m) {
        const Spec& a = spec<D>(2 * m);
        const Spec& b = spec<D>(2 * m + 1);
        if ((a.p0 == x && b.p0 == y) || (a.p1 == x && b.p1 == y)) return true;
    }
    return false;
}

template <typename T, int N, int D, int DAG, int M>
inline void simd_pair(int64_t i, const int32_t* out_site, const int32_t* fwd, const int32_t* bwd,
                      const int32_t* bwd_link, const Cx<T>* links_b, int64_t volume, const Cx<T>* src_b,
                      V4<T> (&acc)[(D == 2 ? 2 : 4) * (D == 2 ? 2 : 4)][N]) {
    constexpr int NS = D == 2 ? 2 : 4;
    constexpr Spec ta = spec<D>(2 * M), tb = spec<D>(2 * M + 1);
    const int64_t ja = ta.backward ? bwd[i * D + ta.mu] : fwd[i * D + ta.mu];
    const int64_t jb = tb.backward ? bwd[i * D + tb.mu] : fwd[i * D + tb.mu];
    const Cx<T>* sa = src_b + ja * NS * N;
    const Cx<T>* sb = src_b + jb * NS * N;
    const int64_t la = ta.backward ? bwd_link[i * D + ta.mu] : out_site[i];
    const Cx<T>* ua = links_b + (ta.mu * volume + la) * N * N;
    constexpr bool shared_link = ta.mu == tb.mu && ta.backward == tb.backward;
    const Cx<T>* ub = ua;
    if constexpr (!shared_link) {
        const int64_t lb = tb.backward ? bwd_link[i * D + tb.mu] : out_site[i];
        ub = links_b + (tb.mu * volume + lb) * N * N;
    }
    // conj sign of the link's imaginary part per lane (backward hop: adjoint)
    constexpr T ca = ta.backward ? -1 : 1, cb = tb.backward ? -1 : 1;
    V4<T> h[N];
    for (int c = 0; c < N; ++c)
        h[c] = pair(sa + ta.p0 * N + c, sb + tb.p0 * N + c) +
               ipow2<ta.k1 + 2 * DAG, tb.k1 + 2 * DAG>(pair(sa + ta.p1 * N + c, sb + tb.p1 * N + c));
    for (int a = 0; a < N; ++a) {
        V4<T> y;
        for (int c = 0; c < N; ++c) {
            // element (a, c) of U (forward) or of U^dagger (backward: conj of U[c][a])
            V4<T> re, im;
            if constexpr (shared_link) {  // broadcast one link element to both lanes
                const Cx<T> x = ta.backward ? ua[c * N + a] : ua[a * N + c];
                re = V4<T>{x.re, x.re, x.re, x.re};
                im = V4<T>{x.im * ca, x.im * ca, x.im * ca, x.im * ca};
            } else {
                const V4<T> x =
                    pair(ua + (ta.backward ? c * N + a : a * N + c), ub + (tb.backward ? c * N + a : a * N + c));
                re = dup_re(x);
                im = dup_im(x) * V4<T>{ca, ca, cb, cb};
            }
            const V4<T> prod = re * h[c] + im * swap_reim(h[c]) * V4<T>{-1, 1, -1, 1};
            y = c == 0 ? prod : y + prod;
        }
        acc[ta.p0 * NS + tb.p0][a] += y;
        acc[ta.p1 * NS + tb.p1][a] += ipow2<ta.kr + 2 * DAG, tb.kr + 2 * DAG>(y);
    }
}

template <typename T, int N, int D, int DAG, int... M>
inline void simd_site(std::integer_sequence<int, M...>, int64_t i, const int32_t* out_site, const int32_t* fwd,
                      const int32_t* bwd, const int32_t* bwd_link, const Cx<T>* links_b, int64_t volume,
                      const Cx<T>* src_b, V4<T> (&acc)[(D == 2 ? 2 : 4) * (D == 2 ? 2 : 4)][N]) {
    (simd_pair<T, N, D, DAG, M>(i, out_site, fwd, bwd, bwd_link, links_b, volume, src_b, acc), ...);
}

template <typename T, int N, int D, int... P>
inline void simd_collect(std::integer_sequence<int, P...>, const V4<T> (&acc)[(D == 2 ? 2 : 4) * (D == 2 ? 2 : 4)][N],
                         Cx<T> (&res)[D == 2 ? 2 : 4][N]) {
    constexpr int NS = D == 2 ? 2 : 4;
    auto one = [&](auto pc) {
        constexpr int p = decltype(pc)::value;
        if constexpr (spin_pair_used<D>(p / NS, p % NS)) {
            for (int a = 0; a < N; ++a) {
                res[p / NS][a].re += acc[p][a][0];
                res[p / NS][a].im += acc[p][a][1];
                res[p % NS][a].re += acc[p][a][2];
                res[p % NS][a].im += acc[p][a][3];
            }
        }
    };
    (one(std::integral_constant<int, P>{}), ...);
}

template <typename T, int N, int D, int DAG>
void simd_impl(int64_t batch, int64_t n_out, int64_t n_src, int64_t volume, const int32_t* out_site,
               const int32_t* fwd, const int32_t* bwd, const int32_t* bwd_link, const T* links_r, const T* src_r,
               const T* base_r, T* out_r, T scale, int n_threads) {
    constexpr int NS = D == 2 ? 2 : 4;
    const auto* links = reinterpret_cast<const Cx<T>*>(links_r);
    const auto* src = reinterpret_cast<const Cx<T>*>(src_r);
    const auto* base = reinterpret_cast<const Cx<T>*>(base_r);
    auto* out = reinterpret_cast<Cx<T>*>(out_r);
#pragma omp parallel for collapse(2) schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < batch; ++b) {
        for (int64_t i = 0; i < n_out; ++i) {
            V4<T> acc[NS * NS][N];
            for (int p = 0; p < NS * NS; ++p)
                for (int c = 0; c < N; ++c) acc[p][c] = V4<T>{0, 0, 0, 0};
            simd_site<T, N, D, DAG>(std::make_integer_sequence<int, D == 2 ? 2 : 8>{}, i, out_site, fwd, bwd,
                                    bwd_link, links + b * D * volume * N * N, volume, src + b * n_src * NS * N, acc);
            Cx<T> res[NS][N];
            for (int sp = 0; sp < NS; ++sp)
                for (int c = 0; c < N; ++c) res[sp][c] = {T(0), T(0)};
            simd_collect<T, N, D>(std::make_integer_sequence<int, NS * NS>{}, acc, res);
            const int64_t bi = b * n_out + i;
            Cx<T>* o = out + bi * NS * N;
            if (base != nullptr) {
                const Cx<T>* bs = base + bi * NS * N;
                for (int sp = 0; sp < NS; ++sp)
                    for (int c = 0; c < N; ++c)
                        o[sp * N + c] = {bs[sp * N + c].re + scale * res[sp][c].re,
                                         bs[sp * N + c].im + scale * res[sp][c].im};
            } else {
                for (int sp = 0; sp < NS; ++sp)
                    for (int c = 0; c < N; ++c) o[sp * N + c] = {scale * res[sp][c].re, scale * res[sp][c].im};
            }
        }
    }
}

// 0: no fixed variant matches; 1: H of the built-in basis; 2: H^dagger of the built-in basis.
inline bool phase_is(double re, double im, int k) {
    static const double table[4][2] = {{1, 0}, {0, 1}, {-1, 0}, {0, -1}};
    const int kk = ((k % 4) + 4) % 4;
    return re == table[kk][0] && im == table[kk][1];
}

inline int match_fixed(int d, int n_spin, int n_terms, const int32_t* ti, const double* tc) {
    const Spec* sp = d == 2 ? kSpec2 : (d == 4 ? kSpec4 : nullptr);
    const int n = d == 2 ? 4 : 16;
    if (sp == nullptr || n_terms != n || n_spin != (d == 2 ? 2 : 4)) return 0;
    for (int dag = 0; dag < 2; ++dag) {
        bool ok = true;
        for (int k = 0; k < n && ok; ++k) {
            const int32_t* a = ti + 8 * k;
            const double* c = tc + 8 * k;
            const Spec& t = sp[k];
            ok = a[0] == t.mu && a[1] == t.backward && a[2] == 2 && a[3] == t.p0 && a[4] == t.p1 && a[5] == 2 &&
                 a[6] == t.p0 && a[7] == t.p1 && phase_is(c[0], c[1], 0) && phase_is(c[2], c[3], t.k1 + 2 * dag) &&
                 phase_is(c[4], c[5], 0) && phase_is(c[6], c[7], t.kr + 2 * dag);
        }
        if (ok) return 1 + dag;
    }
    return 0;
}

template <typename T, int N>
void run_fixed(int variant, int d, int64_t batch, int64_t n_out, int64_t n_src, int64_t volume,
               const int32_t* out_site, const int32_t* fwd, const int32_t* bwd, const int32_t* bwd_link,
               const void* links, const void* src, const void* base, void* out, double scale, int n_threads) {
    const auto* l = static_cast<const T*>(links);
    const auto* s = static_cast<const T*>(src);
    const auto* b = static_cast<const T*>(base);
    auto* o = static_cast<T*>(out);
    const T sc = T(scale);
    if (d == 2 && variant == 1)
        simd_impl<T, N, 2, 0>(batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, l, s, b, o, sc, n_threads);
    else if (d == 2)
        simd_impl<T, N, 2, 1>(batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, l, s, b, o, sc, n_threads);
    else if (variant == 1)
        simd_impl<T, N, 4, 0>(batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, l, s, b, o, sc, n_threads);
    else
        simd_impl<T, N, 4, 1>(batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, l, s, b, o, sc, n_threads);
}

template <typename T>
int load_terms(int n_terms, int n_spin, int d, const int32_t* ti, const double* tc, Term<T>* terms) {
    if (n_terms < 1 || n_terms > kMaxTerms || n_spin > kMaxSpin) return 2;
    for (int k = 0; k < n_terms; ++k) {
        const int32_t* a = ti + 8 * k;
        const double* c = tc + 8 * k;
        Term<T>& t = terms[k];
        t = {a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
             {T(c[0]), T(c[1])}, {T(c[2]), T(c[3])}, {T(c[4]), T(c[5])}, {T(c[6]), T(c[7])}, false, false};
        const bool ok = t.mu >= 0 && t.mu < d && (t.np == 1 || t.np == 2) && (t.nr == 1 || t.nr == 2) &&
                        t.p0 >= 0 && t.p0 < n_spin && t.r0 >= 0 && t.r0 < n_spin &&
                        (t.np == 1 || (t.p1 >= 0 && t.p1 < n_spin)) && (t.nr == 1 || (t.r1 >= 0 && t.r1 < n_spin));
        if (!ok) return 3;
        t.unit_p0 = c[0] == 1.0 && c[1] == 0.0;
        t.unit_r0 = c[4] == 1.0 && c[5] == 0.0;
    }
    return 0;
}

// Start index of each run of terms with the same (mu, backward); returns the number of runs.
template <typename T>
int make_groups(int n_terms, const Term<T>* terms, int* group_start) {
    int n = 0;
    for (int k = 0; k < n_terms; ++k)
        if (k == 0 || terms[k].mu != terms[k - 1].mu || terms[k].backward != terms[k - 1].backward)
            group_start[n++] = k;
    group_start[n] = n_terms;
    return n;
}

template <typename T, int N>
int dispatch_spin(int n_spin, int d, int64_t batch, int64_t n_out, int64_t n_src, int64_t volume,
                  const int32_t* out_site, const int32_t* fwd, const int32_t* bwd, const int32_t* bwd_link,
                  int n_groups, const int* group_start, const Term<T>* terms, const void* links, const void* src,
                  const void* base, void* out, double scale, int n_threads) {
    const auto* l = static_cast<const T*>(links);
    const auto* s = static_cast<const T*>(src);
    const auto* b = static_cast<const T*>(base);
    auto* o = static_cast<T*>(out);
    switch (n_spin) {
        case 2:
            hop_impl<T, N, 2>(d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, n_groups, group_start,
                              terms, l, s, b, o, T(scale), n_threads);
            return 0;
        case 4:
            hop_impl<T, N, 4>(d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, n_groups, group_start,
                              terms, l, s, b, o, T(scale), n_threads);
            return 0;
        default:
            return 1;
    }
}

template <typename T>
int dispatch(int n_colors, int n_spin, int d, int64_t batch, int64_t n_out, int64_t n_src, int64_t volume,
             const int32_t* out_site, const int32_t* fwd, const int32_t* bwd, const int32_t* bwd_link, int n_terms,
             const int32_t* term_int, const double* term_coef, const void* links, const void* src, const void* base,
             void* out, double scale, int n_threads) {
    const int variant = match_fixed(d, n_spin, n_terms, term_int, term_coef);
    if (variant != 0 && n_colors >= 1 && n_colors <= 3) {
        if (n_colors == 1)
            run_fixed<T, 1>(variant, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, links, src, base,
                            out, scale, n_threads);
        else if (n_colors == 2)
            run_fixed<T, 2>(variant, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, links, src, base,
                            out, scale, n_threads);
        else
            run_fixed<T, 3>(variant, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, links, src, base,
                            out, scale, n_threads);
        return 0;
    }
    Term<T> terms[kMaxTerms];
    const int err = load_terms<T>(n_terms, n_spin, d, term_int, term_coef, terms);
    if (err) return err;
    int group_start[kMaxTerms + 1];
    const int n_groups = make_groups<T>(n_terms, terms, group_start);
    switch (n_colors) {
        case 1:
            return dispatch_spin<T, 1>(n_spin, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, n_groups,
                                       group_start, terms, links, src, base, out, scale, n_threads);
        case 2:
            return dispatch_spin<T, 2>(n_spin, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, n_groups,
                                       group_start, terms, links, src, base, out, scale, n_threads);
        case 3:
            return dispatch_spin<T, 3>(n_spin, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link, n_groups,
                                       group_start, terms, links, src, base, out, scale, n_threads);
        default:
            return 1;
    }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unsupported (real type, colour, spin) combination, 2 or 3 for bad term tables.
int latflow_wilson_hop(int real_bytes, int n_colors, int n_spin, int d, int64_t batch, int64_t n_out,
                       int64_t n_src, int64_t volume, const int32_t* out_site, const int32_t* fwd,
                       const int32_t* bwd, const int32_t* bwd_link, int n_terms, const int32_t* term_int,
                       const double* term_coef, const void* links, const void* src, const void* base, void* out,
                       double scale, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    (void)n_threads;  // unused without OpenMP
    if (real_bytes == 4)
        return dispatch<float>(n_colors, n_spin, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link,
                               n_terms, term_int, term_coef, links, src, base, out, scale, n_threads);
    if (real_bytes == 8)
        return dispatch<double>(n_colors, n_spin, d, batch, n_out, n_src, volume, out_site, fwd, bwd, bwd_link,
                                n_terms, term_int, term_coef, links, src, base, out, scale, n_threads);
    return 1;
}

// M_hat^dagger M_hat src on packed even sites in one call: four hops through the packed odd (tmp_odd) and even
// (tmp_even) work fields, M_hat = 1 - kappa^2 H_eo H_oe, M_hat^dagger = 1 - kappa^2 H^dagger_eo H^dagger_oe.
// tab_o* are the tables with odd output sites, tab_e* with even ones; terms of H (h) and of H^dagger (hd).
int latflow_wilson_schur_normal(int real_bytes, int n_colors, int n_spin, int d, int64_t batch, int64_t n_half,
                                int64_t volume, const int32_t* o_site, const int32_t* o_fwd, const int32_t* o_bwd,
                                const int32_t* o_bwd_link, const int32_t* e_site, const int32_t* e_fwd,
                                const int32_t* e_bwd, const int32_t* e_bwd_link, int n_terms, const int32_t* h_int,
                                const double* h_coef, const int32_t* hd_int, const double* hd_coef, const void* links,
                                const void* src, void* tmp_odd, void* tmp_even, void* out, double kappa2,
                                int n_threads) {
    int err = latflow_wilson_hop(real_bytes, n_colors, n_spin, d, batch, n_half, n_half, volume, o_site, o_fwd, o_bwd,
                                 o_bwd_link, n_terms, h_int, h_coef, links, src, nullptr, tmp_odd, 1.0, n_threads);
    if (!err)
        err = latflow_wilson_hop(real_bytes, n_colors, n_spin, d, batch, n_half, n_half, volume, e_site, e_fwd,
                                 e_bwd, e_bwd_link, n_terms, h_int, h_coef, links, tmp_odd, src, tmp_even, -kappa2,
                                 n_threads);
    if (!err)
        err = latflow_wilson_hop(real_bytes, n_colors, n_spin, d, batch, n_half, n_half, volume, o_site, o_fwd, o_bwd,
                                 o_bwd_link, n_terms, hd_int, hd_coef, links, tmp_even, nullptr, tmp_odd, 1.0,
                                 n_threads);
    if (!err)
        err = latflow_wilson_hop(real_bytes, n_colors, n_spin, d, batch, n_half, n_half, volume, e_site, e_fwd,
                                 e_bwd, e_bwd_link, n_terms, hd_int, hd_coef, links, tmp_odd, tmp_even, out, -kappa2,
                                 n_threads);
    return err;
}

// Which path a term table takes: 0 generic, 1 built-in basis H, 2 built-in basis H^dagger.
int latflow_wilson_hop_variant(int d, int n_spin, int n_terms, const int32_t* term_int, const double* term_coef) {
    return match_fixed(d, n_spin, n_terms, term_int, term_coef);
}

// 1 if the library was built with OpenMP (threads honoured), else 0.
int latflow_wilson_hop_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

}  // extern "C"
