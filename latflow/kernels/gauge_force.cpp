// Fused Wilson gauge forces on a periodic lattice, any dimension d >= 2 (plain extern "C" on raw pointers).
//
// Layout (row-major, batch first):
//   U(1) angles  theta [B, d, L0, ..., L{d-1}]           (float or double)
//   SU(N) links  U     [B, d, L0, ..., L{d-1}, N, N]     (complex, interleaved (re, im) pairs)
// Sites are visited row by row: a row is a fixed (b, x_0, ..., x_{d-2}); the last axis x_{d-1} runs
// inside it with unit stride. Neighbour moves along axes a < d-1 shift the row (a constant offset for
// the whole row); moves along the last axis shift j with periodic wrap.
//
// U(1):  F_mu(x) = beta sum_{nu != mu} [ sin P_{mu nu}(x) - sin P_{mu nu}(x - nu) ],
//        P_{mu nu}(x) = t_mu(x) + t_nu(x + mu) - t_mu(x + nu) - t_nu(x)  (P_{nu mu} = -P_{mu nu}),
//        computed plane by plane (mu < nu): s(x) goes to +F_mu(x) and -F_nu(x), s(x - nu) to -F_mu(x),
//        s(x - mu) to +F_nu(x). Two kernels give the same bits: u1_force_planes evaluates every plaquette
//        sine once into a scratch array [n_planes, V] per configuration, then sums (used while that array
//        is at most 64 MiB); u1_force streams row by row, re-evaluating the sines at x - mu and x - nu
//        (shifts along the last axis reuse the row's own sines; for the plane (d-2, d-1), s(x - e_{d-2})
//        is the previous row's s(x) when the same thread computed it).
// SU(N): F_mu(x) = coef ta(U_mu(x) A_mu(x)), A the staple sum of latflow.sun.sun_staples and
//        ta(M) = (M - M^dagger)/2 - tr(M - M^dagger)/(2N) 1.
// Complex arithmetic is written on real pairs (no std::complex).

#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <utility>
#include <vector>

#if defined(__GLIBC__) && defined(__x86_64__)
// glibc's libmvec provides SIMD variants of sin; declaring them lets the compiler vectorise the sine
// loops without -ffast-math (glibc's math.h only does so under __FAST_MATH__).
extern "C" double sin(double) noexcept __attribute__((simd("notinbranch")));
extern "C" float sinf(float) noexcept __attribute__((simd("notinbranch")));
#endif

namespace {

constexpr int kMaxDim = 8;

inline double vsin(double x) { return sin(x); }
inline float vsin(float x) { return sinf(x); }

struct Geometry {
  int d;
  int64_t L[kMaxDim];
  int64_t stride[kMaxDim];
  int64_t volume;
  int64_t ln;     // extent of the last axis
  int64_t nrows;  // volume / ln
};

bool make_geometry(int d, const int64_t* shape, Geometry* g) {
  if (d < 1 || d > kMaxDim) return false;
  g->d = d;
  int64_t s = 1;
  for (int a = d - 1; a >= 0; --a) {
    if (shape[a] < 1) return false;
    g->L[a] = shape[a];
    g->stride[a] = s;
    s *= shape[a];
  }
  g->volume = s;
  g->ln = shape[d - 1];
  g->nrows = s / g->ln;
  return true;
}

// Row-constant neighbour offsets (site deltas) along the axes a < d-1 for row index rr.
inline void row_offsets(const Geometry& g, int64_t rr, int64_t* dplus, int64_t* dminus) {
  int64_t rem = rr;
  for (int a = g.d - 2; a >= 0; --a) {
    const int64_t x = rem % g.L[a];
    rem /= g.L[a];
    const int64_t st = g.stride[a];
    dplus[a] = (x == g.L[a] - 1) ? -(g.L[a] - 1) * st : st;
    dminus[a] = (x == 0) ? (g.L[a] - 1) * st : -st;
  }
}

// --- U(1) ------------------------------------------------------------------------------------------------

// out[j] = sin(t_mu[a0+j] + t_nu[amu+j] - t_mu[anu+j'] - t_nu[a0+j]), j' = j+1 (wrapped) when nu is the
// last axis (then anu is the row a0 itself), else j.
template <typename T>
void plaquette_sines(const T* t_mu, const T* t_nu, int64_t a0, int64_t amu, int64_t anu, bool nu_last,
                     int64_t ln, T* out) {
  if (nu_last) {
#pragma omp simd
    for (int64_t j = 0; j < ln - 1; ++j) out[j] = t_mu[a0 + j] + t_nu[amu + j] - t_mu[a0 + j + 1] - t_nu[a0 + j];
    out[ln - 1] = t_mu[a0 + ln - 1] + t_nu[amu + ln - 1] - t_mu[a0] - t_nu[a0 + ln - 1];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < ln; ++j) out[j] = t_mu[a0 + j] + t_nu[amu + j] - t_mu[anu + j] - t_nu[a0 + j];
  }
#pragma omp simd
  for (int64_t j = 0; j < ln; ++j) out[j] = vsin(out[j]);
}

template <typename T>
void u1_force(const T* theta, T* force, int64_t batch, const Geometry& g, T beta, int nthreads) {
  const int d = g.d;
  const int64_t V = g.volume, ln = g.ln;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> buf(5 * ln);
    T* s_x = buf.data();
    T* s_mnu = s_x + ln;
    T* s_mmu = s_mnu + ln;
    // the sines of plane (d-2, d-1) on the previous row, which is x - e_{d-2} unless x_{d-2} = 0
    T* last_prev = s_mmu + ln;
    T* last_here = last_prev + ln;
    int64_t prev_r = -2;
    int64_t dplus[kMaxDim], dminus[kMaxDim];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < batch * g.nrows; ++r) {
      const int64_t b = r / g.nrows, rr = r % g.nrows;
      const int64_t s0 = rr * ln;
      row_offsets(g, rr, dplus, dminus);
      const bool reuse = (prev_r == r - 1) && (rr % g.L[d - 2] != 0);  // same b and x_{d-2} > 0
      prev_r = r;
      const T* tb = theta + b * d * V;
      T* fb = force + b * d * V;
      for (int mu = 0; mu < d; ++mu) {
        T* f = fb + mu * V + s0;
        for (int64_t j = 0; j < ln; ++j) f[j] = T(0);
      }
      for (int mu = 0; mu < d; ++mu) {
        for (int nu = mu + 1; nu < d; ++nu) {
          const T* t_mu = tb + mu * V;
          const T* t_nu = tb + nu * V;
          const bool nu_last = (nu == d - 1);
          // mu < nu <= d-1, so mu is never the last axis
          plaquette_sines(t_mu, t_nu, s0, s0 + dplus[mu], nu_last ? s0 : s0 + dplus[nu], nu_last, ln, s_x);
          if (nu_last) {
            s_mnu[0] = s_x[ln - 1];
            for (int64_t j = 1; j < ln; ++j) s_mnu[j] = s_x[j - 1];
          } else {
            plaquette_sines(t_mu, t_nu, s0 + dminus[nu], s0 + dminus[nu] + dplus[mu], s0, false, ln, s_mnu);
          }
          const int64_t xm = s0 + dminus[mu];
          const bool last_plane = (mu == d - 2);  // then nu = d-1
          if (last_plane && reuse) {
            for (int64_t j = 0; j < ln; ++j) s_mmu[j] = last_prev[j];
          } else {
            plaquette_sines(t_mu, t_nu, xm, s0, nu_last ? xm : xm + dplus[nu], nu_last, ln, s_mmu);
          }
          if (last_plane) {
            for (int64_t j = 0; j < ln; ++j) last_here[j] = s_x[j];
          }
          T* f_mu = fb + mu * V + s0;
          T* f_nu = fb + nu * V + s0;
#pragma omp simd
          for (int64_t j = 0; j < ln; ++j) {
            f_mu[j] += s_x[j] - s_mnu[j];
            f_nu[j] += s_mmu[j] - s_x[j];
          }
        }
      }
      for (int mu = 0; mu < d; ++mu) {
        T* f = fb + mu * V + s0;
#pragma omp simd
        for (int64_t j = 0; j < ln; ++j) f[j] *= beta;
      }
      std::swap(last_prev, last_here);
    }
  }
}

// The same force in two sweeps per configuration through a scratch array of the d (d-1)/2 plaquette sines
// [n_planes, V] (each sine evaluated once instead of 2-3 times; the arithmetic on the sines is that of
// u1_force, so both give the same bits). Used while the scratch array is at most u1_scratch_limit bytes.
int64_t u1_scratch_limit = int64_t(64) << 20;

template <typename T>
void u1_force_planes(const T* theta, T* force, int64_t batch, const Geometry& g, T beta, int nthreads) {
  const int d = g.d;
  const int n_planes = d * (d - 1) / 2;
  const int64_t V = g.volume, ln = g.ln;
  // scratch: up to 4 MiB kept per calling thread between calls (no allocation and page faults per force)
  const size_t n_scratch = static_cast<size_t>(n_planes) * V;
  thread_local std::vector<T> kept;
  std::unique_ptr<T[]> fresh;
  T* S = nullptr;
  if (n_scratch * sizeof(T) <= (size_t(4) << 20)) {
    if (kept.size() < n_scratch) kept.resize(n_scratch);
    S = kept.data();
  } else {
    fresh.reset(new (std::nothrow) T[n_scratch]);
    if (!fresh) {
      u1_force(theta, force, batch, g, beta, nthreads);
      return;
    }
    S = fresh.get();
  }
#pragma omp parallel num_threads(nthreads)
  {
    int64_t dplus[kMaxDim], dminus[kMaxDim];
    for (int64_t b = 0; b < batch; ++b) {
      const T* tb = theta + b * d * V;
      T* fb = force + b * d * V;
#pragma omp for schedule(static)
      for (int64_t rr = 0; rr < g.nrows; ++rr) {
        const int64_t s0 = rr * ln;
        row_offsets(g, rr, dplus, dminus);
        int p = 0;
        for (int mu = 0; mu < d; ++mu)
          for (int nu = mu + 1; nu < d; ++nu, ++p) {
            const bool nu_last = (nu == d - 1);
            plaquette_sines(tb + mu * V, tb + nu * V, s0, s0 + dplus[mu], nu_last ? s0 : s0 + dplus[nu], nu_last, ln,
                            S + p * V + s0);
          }
      }  // implicit barrier: every sine of configuration b is ready
#pragma omp for schedule(static)
      for (int64_t rr = 0; rr < g.nrows; ++rr) {
        const int64_t s0 = rr * ln;
        row_offsets(g, rr, dplus, dminus);
        for (int mu = 0; mu < d; ++mu) {
          T* f = fb + mu * V + s0;
          for (int64_t j = 0; j < ln; ++j) f[j] = T(0);
        }
        int p = 0;
        for (int mu = 0; mu < d; ++mu)
          for (int nu = mu + 1; nu < d; ++nu, ++p) {
            const T* s_x = S + p * V + s0;
            const T* s_mmu = S + p * V + s0 + dminus[mu];
            T* f_mu = fb + mu * V + s0;
            T* f_nu = fb + nu * V + s0;
            if (nu == d - 1) {  // s(x - nu) is the same row shifted by one
              f_mu[0] += s_x[0] - s_x[ln - 1];
#pragma omp simd
              for (int64_t j = 1; j < ln; ++j) f_mu[j] += s_x[j] - s_x[j - 1];
            } else {
              const T* s_mnu = S + p * V + s0 + dminus[nu];
#pragma omp simd
              for (int64_t j = 0; j < ln; ++j) f_mu[j] += s_x[j] - s_mnu[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < ln; ++j) f_nu[j] += s_mmu[j] - s_x[j];
          }
        for (int mu = 0; mu < d; ++mu) {
          T* f = fb + mu * V + s0;
#pragma omp simd
          for (int64_t j = 0; j < ln; ++j) f[j] *= beta;
        }
      }  // implicit barrier before the scratch array is reused
    }
  }
}

// --- SU(N) -----------------------------------------------------------------------------------------------
// N x N complex matrices as 2 N^2 reals, row-major, (re, im) interleaved.

template <typename T, int N>
inline void mul_nn(const T* a, const T* b, T* c) {  // c = a b
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < N; ++k) {
      T re = 0, im = 0;
      for (int l = 0; l < N; ++l) {
        const T ar = a[2 * (i * N + l)], ai = a[2 * (i * N + l) + 1];
        const T br = b[2 * (l * N + k)], bi = b[2 * (l * N + k) + 1];
        re += ar * br - ai * bi;
        im += ar * bi + ai * br;
      }
      c[2 * (i * N + k)] = re;
      c[2 * (i * N + k) + 1] = im;
    }
}

template <typename T, int N>
inline void mul_nd(const T* a, const T* b, T* c) {  // c = a b^dagger
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < N; ++k) {
      T re = 0, im = 0;
      for (int l = 0; l < N; ++l) {
        const T ar = a[2 * (i * N + l)], ai = a[2 * (i * N + l) + 1];
        const T br = b[2 * (k * N + l)], bi = -b[2 * (k * N + l) + 1];
        re += ar * br - ai * bi;
        im += ar * bi + ai * br;
      }
      c[2 * (i * N + k)] = re;
      c[2 * (i * N + k) + 1] = im;
    }
}

template <typename T, int N>
inline void add_mul_nd(const T* a, const T* b, T* c) {  // c += a b^dagger
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < N; ++k) {
      T re = 0, im = 0;
      for (int l = 0; l < N; ++l) {
        const T ar = a[2 * (i * N + l)], ai = a[2 * (i * N + l) + 1];
        const T br = b[2 * (k * N + l)], bi = -b[2 * (k * N + l) + 1];
        re += ar * br - ai * bi;
        im += ar * bi + ai * br;
      }
      c[2 * (i * N + k)] += re;
      c[2 * (i * N + k) + 1] += im;
    }
}

template <typename T, int N>
inline void add_mul_dn(const T* a, const T* b, T* c) {  // c += a^dagger b
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < N; ++k) {
      T re = 0, im = 0;
      for (int l = 0; l < N; ++l) {
        const T ar = a[2 * (l * N + i)], ai = -a[2 * (l * N + i) + 1];
        const T br = b[2 * (l * N + k)], bi = b[2 * (l * N + k) + 1];
        re += ar * br - ai * bi;
        im += ar * bi + ai * br;
      }
      c[2 * (i * N + k)] += re;
      c[2 * (i * N + k) + 1] += im;
    }
}

// Site index of (row s0, position j) moved by (row delta rd, last-axis shift js in {-1, 0, 1}).
inline int64_t moved(int64_t s0, int64_t j, int64_t ln, int64_t rd, int js) {
  int64_t jj = j + js;
  if (jj < 0) jj += ln;
  if (jj >= ln) jj -= ln;
  return s0 + rd + jj;
}

template <typename T, int N>
void sun_force(const T* u, T* force, int64_t batch, const Geometry& g, T coef, int nthreads) {
  constexpr int M = 2 * N * N;  // reals per matrix
  const int d = g.d;
  const int64_t V = g.volume, ln = g.ln;
#pragma omp parallel num_threads(nthreads)
  {
    int64_t dplus[kMaxDim], dminus[kMaxDim];
    T staple[M], tmp[M], prod[M];
#pragma omp for schedule(static)
    for (int64_t r = 0; r < batch * g.nrows; ++r) {
      const int64_t b = r / g.nrows, rr = r % g.nrows;
      const int64_t s0 = rr * ln;
      row_offsets(g, rr, dplus, dminus);
      const T* ub = u + b * d * V * M;
      T* fb = force + b * d * V * M;
      auto link = [&](int mu, int64_t site) { return ub + (mu * V + site) * M; };
      // a move along axis a by +1 (up) or -1: (row delta, last-axis shift)
      auto rd = [&](int a, bool up) -> int64_t { return a == d - 1 ? 0 : (up ? dplus[a] : dminus[a]); };
      auto js = [&](int a, bool up) -> int { return a == d - 1 ? (up ? 1 : -1) : 0; };
      for (int64_t j = 0; j < ln; ++j) {
        const int64_t x = s0 + j;
        for (int mu = 0; mu < d; ++mu) {
          for (int e = 0; e < M; ++e) staple[e] = T(0);
          const int64_t xpmu = moved(s0, j, ln, rd(mu, true), js(mu, true));
          for (int nu = 0; nu < d; ++nu) {
            if (nu == mu) continue;
            const int64_t xpnu = moved(s0, j, ln, rd(nu, true), js(nu, true));
            const int64_t xmnu = moved(s0, j, ln, rd(nu, false), js(nu, false));
            const int64_t xpmu_mnu = moved(s0, j, ln, rd(mu, true) + rd(nu, false), js(mu, true) + js(nu, false));
            // upper: U_nu(x+mu) U_mu(x+nu)^dagger U_nu(x)^dagger
            mul_nd<T, N>(link(nu, xpmu), link(mu, xpnu), tmp);
            add_mul_nd<T, N>(tmp, link(nu, x), staple);
            // lower: U_nu(x+mu-nu)^dagger U_mu(x-nu)^dagger U_nu(x-nu) = (U_mu(x-nu) U_nu(x+mu-nu))^dagger U_nu(x-nu)
            mul_nn<T, N>(link(mu, xmnu), link(nu, xpmu_mnu), tmp);
            add_mul_dn<T, N>(tmp, link(nu, xmnu), staple);
          }
          mul_nn<T, N>(link(mu, x), staple, prod);
          // F = coef ta(prod): (P - P^dagger)/2 - tr(P - P^dagger)/(2N)
          T* f = fb + (mu * V + x) * M;
          T tr_im = 0;
          for (int i = 0; i < N; ++i) tr_im += prod[2 * (i * N + i) + 1];
          const T shift = tr_im / T(N);
          for (int i = 0; i < N; ++i)
            for (int k = 0; k < N; ++k) {
              const int ik = 2 * (i * N + k), ki = 2 * (k * N + i);
              T re = T(0.5) * (prod[ik] - prod[ki]);
              T im = T(0.5) * (prod[ik + 1] + prod[ki + 1]);
              if (i == k) im -= shift;
              f[ik] = coef * re;
              f[ik + 1] = coef * im;
            }
        }
      }
    }
  }
}

template <typename T>
int sun_dispatch(const T* u, T* force, int64_t batch, const Geometry& g, int n, T coef, int nthreads) {
  switch (n) {
    case 1: sun_force<T, 1>(u, force, batch, g, coef, nthreads); return 0;
    case 2: sun_force<T, 2>(u, force, batch, g, coef, nthreads); return 0;
    case 3: sun_force<T, 3>(u, force, batch, g, coef, nthreads); return 0;
    default: return 2;
  }
}

}  // namespace

extern "C" {

// Largest scratch array (bytes) of the two-sweep U(1) force; above it the one-sweep kernel runs (tests set
// 0 to check that both give the same force). Returns the previous limit.
int64_t latflow_u1_force_scratch_limit(int64_t bytes) {
  const int64_t previous = u1_scratch_limit;
  u1_scratch_limit = bytes;
  return previous;
}

// Return codes: 0 ok, 1 bad geometry (d outside [2, 8] or an extent < 1), 2 unsupported N.

int latflow_u1_force_f64(const double* theta, double* force, int64_t batch, int d, const int64_t* shape,
                         double beta, int nthreads) {
  Geometry g;
  if (d < 2 || !make_geometry(d, shape, &g)) return 1;
  const int64_t scratch = int64_t(d) * (d - 1) / 2 * g.volume * int64_t(sizeof(double));
  if (scratch <= u1_scratch_limit)
    u1_force_planes<double>(theta, force, batch, g, beta, nthreads);
  else
    u1_force<double>(theta, force, batch, g, beta, nthreads);
  return 0;
}

int latflow_u1_force_f32(const float* theta, float* force, int64_t batch, int d, const int64_t* shape,
                         double beta, int nthreads) {
  Geometry g;
  if (d < 2 || !make_geometry(d, shape, &g)) return 1;
  const int64_t scratch = int64_t(d) * (d - 1) / 2 * g.volume * int64_t(sizeof(float));
  if (scratch <= u1_scratch_limit)
    u1_force_planes<float>(theta, force, batch, g, static_cast<float>(beta), nthreads);
  else
    u1_force<float>(theta, force, batch, g, static_cast<float>(beta), nthreads);
  return 0;
}

int latflow_sun_force_c128(const double* u, double* force, int64_t batch, int d, const int64_t* shape, int n,
                           double coef, int nthreads) {
  Geometry g;
  if (d < 2 || !make_geometry(d, shape, &g)) return 1;
  return sun_dispatch<double>(u, force, batch, g, n, coef, nthreads);
}

int latflow_sun_force_c64(const float* u, float* force, int64_t batch, int d, const int64_t* shape, int n,
                          double coef, int nthreads) {
  Geometry g;
  if (d < 2 || !make_geometry(d, shape, &g)) return 1;
  return sun_dispatch<float>(u, force, batch, g, n, static_cast<float>(coef), nthreads);
}

}  // extern "C"
