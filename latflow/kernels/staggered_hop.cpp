// Fused staggered Dirac apply on a periodic (antiperiodic in time) lattice, d >= 2 (plain extern "C").
//
//   out(x) = sign * (D_st psi)(x) + m(x) psi(x),
//   (D_st psi)(x) = sum_mu [ sf_mu(x) U_mu(x) psi(x+mu) - sb_mu(x) U_mu(x-mu)^dagger psi(x-mu) ],
//
// sf = sb = eta_mu(x) / 2 with eta_mu(x) = (-1)^(x_0 + ... + x_{mu-1}), and with antiperiodic time
// sf_0 flips sign at x_0 = L0 - 1 and sb_0 at x_0 = 0 (latflow.fermions.staggered.StaggeredDirac).
// The mass m(x) is a real array [B, V], a constant, or absent.
//
// Layout (row-major, batch first, complex numbers as interleaved (re, im) pairs):
//   psi, out  [B, L0, ..., L{d-1}]          (no links, U(1))  or  [B, L0, ..., L{d-1}, N]  (SU(N))
//   links     none  /  [B, d, L0, ...] (U(1))  /  [B, d, L0, ..., N, N] (SU(N))
// Rows are fixed (b, x_0, ..., x_{d-2}); since eta_mu only depends on x_0 .. x_{mu-1}, mu <= d-1, the
// phases are constant along a row.

#include <cstdint>

namespace {

constexpr int kMaxDim = 8;

struct Geometry {
  int d;
  int64_t L[kMaxDim];
  int64_t stride[kMaxDim];
  int64_t volume;
  int64_t ln;
  int64_t nrows;
};

bool make_geometry(int d, const int64_t* shape, Geometry* g) {
  if (d < 2 || d > kMaxDim) return false;
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

// Row coordinates (axes 0 .. d-2) and neighbour site deltas along them.
inline void row_setup(const Geometry& g, int64_t rr, int64_t* coord, int64_t* dplus, int64_t* dminus) {
  int64_t rem = rr;
  for (int a = g.d - 2; a >= 0; --a) {
    const int64_t x = rem % g.L[a];
    rem /= g.L[a];
    coord[a] = x;
    const int64_t st = g.stride[a];
    dplus[a] = (x == g.L[a] - 1) ? -(g.L[a] - 1) * st : st;
    dminus[a] = (x == 0) ? (g.L[a] - 1) * st : -st;
  }
}

// acc += s * (U psi)  (NC colours; NL = 0: U = 1, NL = 1: U(1) phase, NL = N: N x N matrix)
template <typename T, int NL, int NC>
inline void add_link_times(T s, const T* u, const T* psi, T* acc) {
  if constexpr (NL == 0) {
    acc[0] += s * psi[0];
    acc[1] += s * psi[1];
  } else if constexpr (NL == 1) {
    acc[0] += s * (u[0] * psi[0] - u[1] * psi[1]);
    acc[1] += s * (u[0] * psi[1] + u[1] * psi[0]);
  } else {
    for (int i = 0; i < NC; ++i) {
      T re = 0, im = 0;
      for (int k = 0; k < NC; ++k) {
        const T ur = u[2 * (i * NC + k)], ui = u[2 * (i * NC + k) + 1];
        const T pr = psi[2 * k], pi = psi[2 * k + 1];
        re += ur * pr - ui * pi;
        im += ur * pi + ui * pr;
      }
      acc[2 * i] += s * re;
      acc[2 * i + 1] += s * im;
    }
  }
}

// acc += s * (U^dagger psi)
template <typename T, int NL, int NC>
inline void add_link_dagger_times(T s, const T* u, const T* psi, T* acc) {
  if constexpr (NL == 0) {
    acc[0] += s * psi[0];
    acc[1] += s * psi[1];
  } else if constexpr (NL == 1) {
    acc[0] += s * (u[0] * psi[0] + u[1] * psi[1]);
    acc[1] += s * (u[0] * psi[1] - u[1] * psi[0]);
  } else {
    for (int i = 0; i < NC; ++i) {
      T re = 0, im = 0;
      for (int k = 0; k < NC; ++k) {
        const T ur = u[2 * (k * NC + i)], ui = -u[2 * (k * NC + i) + 1];
        const T pr = psi[2 * k], pi = psi[2 * k + 1];
        re += ur * pr - ui * pi;
        im += ur * pi + ui * pr;
      }
      acc[2 * i] += s * re;
      acc[2 * i + 1] += s * im;
    }
  }
}

template <typename T, int NL>
void apply(const T* psi, const T* links, const T* mass, T* out, int64_t batch, const Geometry& g, T sign,
           T mass_const, bool use_mass, bool antiperiodic, int nthreads) {
  constexpr int NC = NL <= 1 ? 1 : NL;            // colour components of psi
  constexpr int PS = 2 * NC;                      // reals per site of psi
  constexpr int LS = NL == 0 ? 0 : 2 * NC * NC;   // reals per link
  const int d = g.d;
  const int64_t V = g.volume, ln = g.ln;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < batch * g.nrows; ++r) {
    const int64_t b = r / g.nrows, rr = r % g.nrows;
    const int64_t s0 = rr * ln;
    int64_t coord[kMaxDim], dplus[kMaxDim], dminus[kMaxDim];
    T sf[kMaxDim], sb[kMaxDim];
    row_setup(g, rr, coord, dplus, dminus);
    int64_t parity = 0;
    for (int mu = 0; mu < d; ++mu) {
      const T eta = (parity % 2 == 0) ? T(0.5) : T(-0.5);
      sf[mu] = eta;
      sb[mu] = eta;
      if (mu < d - 1) parity += coord[mu];
    }
    if (antiperiodic) {  // axis 0 is a row axis (d >= 2)
      if (coord[0] == g.L[0] - 1) sf[0] = -sf[0];
      if (coord[0] == 0) sb[0] = -sb[0];
    }
    const T* pb = psi + b * V * PS;
    const T* ub = links + (NL == 0 ? 0 : b * d * V * LS);
    const T* mb = use_mass && mass ? mass + b * V : nullptr;
    T* ob = out + b * V * PS;
    for (int64_t j = 0; j < ln; ++j) {
      const int64_t x = s0 + j;
      T acc[PS];
      for (int c = 0; c < PS; ++c) acc[c] = T(0);
      for (int mu = 0; mu < d; ++mu) {
        int64_t xp, xm;
        if (mu == d - 1) {
          xp = s0 + (j + 1 == ln ? 0 : j + 1);
          xm = s0 + (j == 0 ? ln - 1 : j - 1);
        } else {
          xp = x + dplus[mu];
          xm = x + dminus[mu];
        }
        const T* u_here = NL == 0 ? nullptr : ub + (mu * V + x) * LS;
        const T* u_back = NL == 0 ? nullptr : ub + (mu * V + xm) * LS;
        add_link_times<T, NL, NC>(sf[mu], u_here, pb + xp * PS, acc);
        add_link_dagger_times<T, NL, NC>(-sb[mu], u_back, pb + xm * PS, acc);
      }
      T* o = ob + x * PS;
      const T* p = pb + x * PS;
      if (use_mass) {
        const T m = mb ? mb[x] : mass_const;
        for (int c = 0; c < PS; ++c) o[c] = sign * acc[c] + m * p[c];
      } else {
        for (int c = 0; c < PS; ++c) o[c] = sign * acc[c];
      }
    }
  }
}

template <typename T>
int dispatch(const T* psi, const T* links, const T* mass, T* out, int64_t batch, int d, const int64_t* shape,
             int n_links, double sign, double mass_const, int use_mass, int antiperiodic, int nthreads) {
  Geometry g;
  if (!make_geometry(d, shape, &g)) return 1;
  const T s = static_cast<T>(sign), m = static_cast<T>(mass_const);
  const bool um = use_mass != 0, ap = antiperiodic != 0;
  switch (n_links) {
    case 0: apply<T, 0>(psi, links, mass, out, batch, g, s, m, um, ap, nthreads); return 0;
    case 1: apply<T, 1>(psi, links, mass, out, batch, g, s, m, um, ap, nthreads); return 0;
    case 2: apply<T, 2>(psi, links, mass, out, batch, g, s, m, um, ap, nthreads); return 0;
    case 3: apply<T, 3>(psi, links, mass, out, batch, g, s, m, um, ap, nthreads); return 0;
    default: return 2;
  }
}

}  // namespace

extern "C" {

// n_links: 0 no links (U = 1), 1 U(1), 2 or 3 SU(N). mass: real [B, V] or null (then mass_const when
// use_mass). Return codes: 0 ok, 1 bad geometry (d outside [2, 8] or an extent < 1), 2 unsupported n_links.

int latflow_staggered_apply_c128(const double* psi, const double* links, const double* mass, double* out,
                                 int64_t batch, int d, const int64_t* shape, int n_links, double sign,
                                 double mass_const, int use_mass, int antiperiodic, int nthreads) {
  return dispatch<double>(psi, links, mass, out, batch, d, shape, n_links, sign, mass_const, use_mass,
                          antiperiodic, nthreads);
}

int latflow_staggered_apply_c64(const float* psi, const float* links, const float* mass, float* out,
                                int64_t batch, int d, const int64_t* shape, int n_links, double sign,
                                double mass_const, int use_mass, int antiperiodic, int nthreads) {
  return dispatch<float>(psi, links, mass, out, batch, d, shape, n_links, sign, mass_const, use_mass,
                         antiperiodic, nthreads);
}

}  // extern "C"
