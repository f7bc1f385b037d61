// Fast CPU autoregressive generation for the wavedistill WaveNet teacher.
//
// A plain C ABI (loaded with ctypes) so that the build needs no torch or
// pybind11 headers and compiles in ~2 s.  The Python side
// (wavedistill/generation/cpp.py) packs the linearised weights of
// wavedistill.generation.CachedGenerator into one float32 buffer.  This file
// runs, for T steps, the conditioning projections of all layers (as
// CachedGenerator.cond_block: one matrix product per chunk of CT steps, never
// per sample), the per-step maths of CachedGenerator.step (ring-buffer taps,
// gate matvec + conditioning, tanh·sigmoid, residual/skip matvec, head) and the
// sampling from explicit uniform noise of DiscretizedMixtureOfLogistics.sample /
// DiscretizedGaussian.sample (same clamps, same operation order).
//
// Layout conventions (all float32; "padded" sizes are multiples of 16 floats,
// padding entries of weights and biases are zero so padded lanes stay zero):
//   gate weights  Wg [k*Rp, 2*Hp]  row j*Rp + r multiplies tap j, channel r;
//                                  columns [0, Hp) the tanh half, [Hp, 2Hp) the sigmoid half
//   out weights   Wo [Hp, Rp+Sp]   columns [0, Rp) residual (already × sqrt(1/2)), [Rp, Rp+Sp) skip
//   head          h1w [Sp, Sp], h2w [Sp, Pp]
//   ring buffers  exactly GenerationCache.buffers: layer l is [(k-1)·d_l, B, R], unpadded.
//   cond weights  Wc [C, LGp]      column l*G + g is layer l, gate channel g (unpadded per layer)
//   conditioning  c[b*csb + ch*csc + t*cst], the upsampled features, any strides;
//                 or, when cfg C is 0, the projections of all layers already made
//                 (wavedistill.generation.FrameConditioning): c[b*csb + (l*G + g) + t*cst], csc = 1.
//   noise         uniform, u[b*nsb + j*nsc + t*nst], j < NN (MoL: K+1, Gaussian: 1).
//   predictors    (source-filter teachers, optional) a[b*lsb + t*lst + k], k < p: the linear predictor of
//                 every step (LPCoefficients.per_sample); history h[b*p + k] = x_{t-1-k}, most recent first
//                 (GenerationCache.lp_history), updated in place.  The prediction Σ_k a_k·h_k is added to
//                 every location (MoL: each component's mean; Gaussian: the mean) before sampling, as
//                 CachedGenerator.run does with dist.shift; the history holds the clamped samples.
//
// No -ffast-math: tanh/sigmoid use an exp with ~1 ulp error (Cephes
// polynomials), so the results match torch's to float32 rounding.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include <sched.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FG_PAUSE() _mm_pause()
#else
#define FG_PAUSE() \
  do {             \
  } while (0)
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
constexpr int PAD = 16;  // padding granularity used by the Python packer; a multiple of VW
static_assert(PAD % VW == 0, "PAD must be a multiple of the vector width");

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

inline vf ld(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline vf bc(float x) {
  vf zero = {};
  return x - zero;  // broadcast (x - (+0) keeps the sign of -0, unlike x + 0)
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp(x), Cephes expf: x = n·ln2 + r, polynomial in r, scale by 2^n.  ~1 ulp.
inline vf v_exp(vf x) {
  x = vmin(vmax(x, bc(-87.0f)), bc(88.0f));
  const vf magic = bc(12582912.0f);  // 1.5·2^23: adding it rounds to an integer
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vi ni = (vi)t - (vi)magic;  // the integer n itself
  x = x - n * 0.693359375f;
  x = x - n * -2.12194440e-4f;
  vf z = x * x;
  vf p = bc(1.9875691500E-4f);
  p = p * x + 1.3981999507E-3f;
  p = p * x + 8.3334519073E-3f;
  p = p * x + 4.1665795894E-2f;
  p = p * x + 1.6666665459E-1f;
  p = p * x + 5.0000001201E-1f;
  p = p * z + x + 1.0f;
  vi e = (ni + 127) << 23;
  return p * (vf)e;
}

// tanh(x), Cephes tanhf: odd polynomial for |x| < 0.625, else 1 - 2/(e^{2|x|}+1).
inline vf v_tanh(vf x) {
  const vi zero = {};
  const vi signmask = zero + INT32_MIN;
  vf ax = (vf)((vi)x & ~signmask);
  vf s = x * x;
  vf p = bc(-5.70498872745E-3f);
  p = p * s + 2.06390887954E-2f;
  p = p * s - 5.37397155531E-2f;
  p = p * s + 1.33314422036E-1f;
  p = p * s - 3.33332819422E-1f;
  p = p * s * x + x;
  vf e = v_exp(vmin(ax + ax, bc(88.0f)));
  vf l = 1.0f - 2.0f / (e + 1.0f);
  l = (vf)(((vi)l & ~signmask) | ((vi)x & signmask));
  return ax < 0.625f ? p : l;
}

// sigmoid as torch's CPU kernel writes it: 1 / (1 + exp(-x)).
inline vf v_sigmoid(vf x) { return 1.0f / (1.0f + v_exp(-x)); }

// Standard normal quantile in double: Acklam's rational approximation (relative
// error < 1.2e-9) polished by one Halley step on erfc, i.e. to double precision.
double ndtri(double p) {
  if (!(p > 0.0)) return p == 0.0 ? -INFINITY : NAN;
  if (!(p < 1.0)) return p == 1.0 ? INFINITY : NAN;
  if (p > 0.5) return -ndtri(1.0 - p);  // exact for p >= 0.5; keeps the Halley step in the lower tail
  static const double a[6] = {-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
                              1.383577518672690e+02,  -3.066479806614716e+01, 2.506628277459239e+00};
  static const double b[5] = {-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
                              6.680131188771972e+01,  -1.328068155288572e+01};
  static const double c[6] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
                              -2.549732539343734e+00, 4.374664141464968e+00,  2.938163982698783e+00};
  static const double d[4] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
                              3.754408661907416e+00};
  const double lo = 0.02425;
  double x;
  if (p < lo) {
    const double q = std::sqrt(-2.0 * std::log(p));
    x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
        ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0);
  } else {
    const double q = p - 0.5, r = q * q;
    x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0);
  }
  // Halley step: e = Φ(x) - p, Φ(x) = erfc(-x/√2)/2.
  const double e = 0.5 * std::erfc(-x / std::sqrt(2.0)) - p;
  const double u = e * std::sqrt(2.0 * M_PI) * std::exp(0.5 * x * x);
  return x - u / (1.0 + 0.5 * x * u);
}

// y[b, 0:NV·VW] (+)= bias + Σ_i x[b, i] · W[i, 0:NV·VW] for NB batch rows; with ACC the
// accumulators start from y instead of the bias.
template <int NB, int NV, bool ACC>
inline void mv_tile(const float* __restrict W, int64_t ldw, int64_t nin, const float* __restrict x, int64_t ldx,
                    const float* __restrict bias, float* __restrict y, int64_t ldy) {
  vf acc[NB][NV];
  for (int v = 0; v < NV; ++v) {
    vf b0 = bias ? ld(bias + v * VW) : bc(0.0f);
    for (int b = 0; b < NB; ++b) acc[b][v] = ACC ? ld(y + b * ldy + v * VW) : b0;
  }
  for (int64_t i = 0; i < nin; ++i) {
    const float* w = W + i * ldw;
    vf wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = ld(w + v * VW);
    for (int b = 0; b < NB; ++b) {
      vf xb = bc(x[b * ldx + i]);
      for (int v = 0; v < NV; ++v) acc[b][v] += xb * wv[v];
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int v = 0; v < NV; ++v) st(y + b * ldy + v * VW, acc[b][v]);
}

template <int NB, bool ACC>
inline void mv_rows(const float* W, int64_t ldw, int64_t nin, int64_t nout, const float* x, int64_t ldx,
                    const float* bias, float* y, int64_t ldy) {
  // Accumulator tiles sized to the register file (32 zmm with AVX-512, 16 ymm otherwise).
  constexpr int MAXV = VW == 16 ? (NB >= 4 ? 4 : 8) : (NB == 1 ? 8 : (NB == 2 ? 4 : 2));
  int64_t j = 0;
  auto tile = [&](auto nv_tag) {
    constexpr int NV = decltype(nv_tag)::value;
    while (nout - j >= NV * VW) {
      mv_tile<NB, NV, ACC>(W + j, ldw, nin, x, ldx, bias ? bias + j : nullptr, y + j, ldy);
      j += NV * VW;
    }
  };
  tile(std::integral_constant<int, MAXV>{});
  if constexpr (MAXV > 4) tile(std::integral_constant<int, 4>{});
  if constexpr (MAXV > 2) tile(std::integral_constant<int, 2>{});
  if constexpr (MAXV > 1) tile(std::integral_constant<int, 1>{});
}

// y[b, 0:nout] = bias + x[b, 0:nin] @ W[0:nin, 0:nout] for b < nb (y += x @ W with
// accumulate); nout a multiple of VW.
template <bool ACC = false>
void matvec(const float* W, int64_t ldw, int64_t nin, int64_t nout, const float* x, int64_t ldx, int64_t nb,
            const float* bias, float* y, int64_t ldy) {
  if (nout <= 0) return;
  int64_t b = 0;
  for (; nb - b >= 4; b += 4) mv_rows<4, ACC>(W, ldw, nin, nout, x + b * ldx, ldx, bias, y + b * ldy, ldy);
  for (; nb - b >= 2; b += 2) mv_rows<2, ACC>(W, ldw, nin, nout, x + b * ldx, ldx, bias, y + b * ldy, ldy);
  for (; b < nb; ++b) mv_rows<1, ACC>(W, ldw, nin, nout, x + b * ldx, ldx, bias, y + b * ldy, ldy);
}

// Y[r, :] = X[r, :] @ W for r < nrows (no bias); column tiles outermost so that a
// tile of W stays in L1 while every row is multiplied by it.
void matmul(const float* W, int64_t ldw, int64_t nin, int64_t nout, const float* X, int64_t ldx, int64_t nrows,
            float* Y, int64_t ldy) {
  constexpr int NVT = 4;
  int64_t j = 0;
  for (; nout - j >= NVT * VW; j += NVT * VW) {
    int64_t r = 0;
    for (; nrows - r >= 4; r += 4)
      mv_tile<4, NVT, false>(W + j, ldw, nin, X + r * ldx, ldx, nullptr, Y + r * ldy + j, ldy);
    for (; r < nrows; ++r) mv_tile<1, NVT, false>(W + j, ldw, nin, X + r * ldx, ldx, nullptr, Y + r * ldy + j, ldy);
  }
  for (; j < nout; j += VW) {
    int64_t r = 0;
    for (; nrows - r >= 4; r += 4)
      mv_tile<4, 1, false>(W + j, ldw, nin, X + r * ldx, ldx, nullptr, Y + r * ldy + j, ldy);
    for (; r < nrows; ++r) mv_tile<1, 1, false>(W + j, ldw, nin, X + r * ldx, ldx, nullptr, Y + r * ldy + j, ldy);
  }
}

// Counting barrier for a small team: spin briefly, then yield (the machine may be
// shared, and a descheduled partner must not cost a whole time slice of spinning).
struct Barrier {
  alignas(64) std::atomic<int> count{0};
  alignas(64) std::atomic<int> gen{0};
  int n = 1;
  void wait() {
    if (n <= 1) return;
    int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      gen.store(g + 1, std::memory_order_release);
      return;
    }
    int spins = 0;
    while (gen.load(std::memory_order_acquire) == g) {
      if (++spins < 4000) {
        FG_PAUSE();
      } else {
        sched_yield();
      }
    }
  }
};

// Integer configuration, in the order generation/cpp.py writes it.
enum Cfg {
  C_L, C_K, C_R, C_RP, C_G, C_H, C_HP, C_S, C_SP, C_P, C_PP, C_DIST, C_MIX, C_NN,
  C_OFF_WIN, C_OFF_BIN, C_OFF_H1W, C_OFF_H1B, C_OFF_H2W, C_OFF_H2B,
  C_C, C_LGP, C_OFF_WC,
  C_FIXED  // then per layer: dilation, offset Wg, offset bg, offset Wo, offset bo
};
constexpr int PER_LAYER = 5;
#ifndef FG_CHUNK
#define FG_CHUNK 32
#endif
constexpr int64_t CT = FG_CHUNK;  // steps per conditioning chunk (CT·L·G floats stay in L2)

// Everything a call shares.  Batch rows are split between teams (independent
// streams, no synchronisation); within a team, threads split the gated channels
// of every layer and meet at one barrier per layer.
struct Ctx {
  const float* wts;
  const int64_t* cfg;
  float* const* bufs;   // ring buffers, [(k-1)·d, B, R] each
  int64_t B, Tb, t0;
  const float* cin;     // conditioning features c[b*csb + ch*csc + tl*cst]
  int64_t csb, csc, cst;
  const float* noise;   // uniform noise u[b*nsb + j*nsc + tl*nst]
  int64_t nsb, nsc, nst;
  float* x_prev;        // [B]
  float* out;           // out[b*osb + tl*ost]
  int64_t osb, ost;
  float temperature, log_scale_min, skip_scale, sqrt_half;
  float* params_out;    // [Tb, B, P] or null (the parameters sampled from: shifted by the prediction)
  const float* lpc;     // predictors a[b*lsb + tl*lst + k], k < order; null: no linear prediction
  int64_t lsb, lst, order;
  float* lp_hist;       // [B, order]: x_{t-1-k} at k, most recent first
};

struct Team {
  int64_t b0, nb;       // batch rows [b0, b0+nb)
  int size;
  Barrier bar;
  std::vector<float> opart;  // [size, 2, nb, Rp+Sp] partial residual/skip outputs
  std::vector<float> ctr;    // [CT, nb, C] a chunk of c, transposed (lead only)
  std::vector<float> cond;   // [CT, nb, LGp] conditioning projections of the chunk
};

void sample_step(const Ctx& c, const Team& team, int64_t tl, float* params, int64_t Pp) {
  const int64_t* cfg = c.cfg;
  const int64_t B = c.B, K = cfg[C_MIX], P = cfg[C_P];
  const bool mol = cfg[C_DIST] == 0;
  for (int64_t r = 0; r < team.nb; ++r) {
    const int64_t b = team.b0 + r;
    float* pr = params + r * Pp;
    float* hist = c.lpc ? c.lp_hist + b * c.order : nullptr;
    if (c.lpc) {  // the location shift x̂_t = Σ_k a_k(t)·x_{t-1-k} (dist.shift)
      const float* a = c.lpc + b * c.lsb + tl * c.lst;
      float pred = 0.0f;
      for (int64_t q = 0; q < c.order; ++q) pred += a[q] * hist[q];
      if (mol)
        for (int64_t q = 0; q < K; ++q) pr[K + q] += pred;
      else
        pr[0] += pred;
    }
    const float* nz = c.noise + b * c.nsb + tl * c.nst;
    auto clamp = [](float v, float lo, float hi) { return std::min(std::max(v, lo), hi); };
    float x;
    if (mol) {
      // Gumbel-max: argmax(logits - log(-log(u))), the first maximum as torch.argmax.
      const float umin = 1e-10f, umax = (float)(1.0 - 1e-7);
      int64_t best = 0;
      float bv = 0.0f;
      for (int64_t q = 0; q < K; ++q) {
        const float u = clamp(nz[q * c.nsc], umin, umax);
        const float v = pr[q] + -std::log(-std::log(u));
        if (q == 0 || v > bv) {
          bv = v;
          best = q;
        }
      }
      // Logistic by inverse CDF: m + s·T·(log u - log(1-u)).
      const float u = clamp(nz[K * c.nsc], 1e-5f, (float)(1.0 - 1e-5));
      const float m = pr[K + best];
      const float ls = std::max(pr[2 * K + best], c.log_scale_min);
      const float scale = std::exp(ls) * c.temperature;
      x = m + scale * (std::log(u) - std::log1p(-u));
    } else {
      const float u = clamp(nz[0], 1e-6f, (float)(1.0 - 1e-6));
      const float ls = std::max(pr[1], c.log_scale_min);
      const float scale = std::exp(ls) * c.temperature;
      x = pr[0] + scale * (float)ndtri((double)u);
    }
    x = std::min(std::max(x, -1.0f), 1.0f);
    if (hist && c.order > 0) {
      std::memmove(hist + 1, hist, sizeof(float) * (c.order - 1));
      hist[0] = x;
    }
    c.x_prev[b] = x;
    c.out[b * c.osb + tl * c.ost] = x;
    if (c.params_out) std::memcpy(c.params_out + (tl * B + b) * P, pr, sizeof(float) * P);
  }
}

void worker(const Ctx& c, Team& team, int p) {
  const int64_t* cfg = c.cfg;
  const int64_t L = cfg[C_L], k = cfg[C_K], R = cfg[C_R], Rp = cfg[C_RP], G = cfg[C_G], H = cfg[C_H],
                Hp = cfg[C_HP], Sp = cfg[C_SP], Pp = cfg[C_PP], C = cfg[C_C], LGp = cfg[C_LGP];
  const int64_t Gp = 2 * Hp, RSp = Rp + Sp, B = c.B, b0 = team.b0, nb = team.nb;
  const float* w = c.wts;
  const int np = team.size;
  const bool lead = p == 0;

  // This thread's share of the gated channels (whole vectors).
  const int64_t nhv = Hp / VW;
  const int64_t j0 = (nhv * p) / np * VW, j1 = (nhv * (p + 1)) / np * VW, nj = j1 - j0;

  std::vector<float> g(nb * Gp, 0.0f), z(nb * Hp, 0.0f), h(nb * Rp, 0.0f), osum(nb * RSp, 0.0f),
      skip(nb * Sp, 0.0f), s0(nb * Sp, 0.0f), s1(nb * Sp, 0.0f), params(nb * Pp, 0.0f);
  const float* w_in = w + cfg[C_OFF_WIN];
  const float* b_in = w + cfg[C_OFF_BIN];
  const float c_half = c.sqrt_half;
  float* cond = team.cond.data();

  for (int64_t tl = 0; tl < c.Tb; ++tl) {
    const int64_t t = c.t0 + tl;
    if (C > 0 && tl % CT == 0) {  // conditioning projections of all layers for the next CT steps
      if (lead) {
        const int64_t n = std::min(CT, c.Tb - tl);
        float* ctr = team.ctr.data();
        for (int64_t q = 0; q < n; ++q)
          for (int64_t r = 0; r < nb; ++r)
            for (int64_t ch = 0; ch < C; ++ch)
              ctr[(q * nb + r) * C + ch] = c.cin[(b0 + r) * c.csb + ch * c.csc + (tl + q) * c.cst];
        matmul(w + cfg[C_OFF_WC], LGp, C, LGp, ctr, C, n * nb, cond, LGp);
      }
      team.bar.wait();
    }
    for (int64_t r = 0; r < nb; ++r) {
      const vf xp = bc(c.x_prev[b0 + r]);
      for (int64_t v = 0; v < Rp; v += VW) st(&h[r * Rp + v], xp * ld(w_in + v) + ld(b_in + v));
    }
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* lc = cfg + C_FIXED + PER_LAYER * l;
      const int64_t d = lc[0], m = (k - 1) * d;
      const float* Wg = w + lc[1];
      const float* bg = w + lc[2];
      const float* Wo = w + lc[3];
      const float* bo = w + lc[4];
      float* buf = c.bufs[l];
      // Warm the cache for this layer's oldest tap at the next step (the weights
      // stream sequentially and the hardware prefetches them).
      if (tl + 1 < c.Tb) {
        const int64_t slot = ((t + 1 - (k - 1) * d) % m + m) % m;
        const float* pf = buf + (slot * B + b0) * R;
        for (int64_t q = 0; q < nb * R; q += 16) __builtin_prefetch(pf + q, 0, 1);
      }
      if (nj > 0) {
        // Gate: taps read in place from the ring buffer (oldest first), then the current h.
        // All gated channels in one product when this thread owns them all.
        const int64_t cols[2][2] = {{j0, nj}, {Hp + j0, nj}};
        const int nparts = nj == Hp ? 1 : 2;
        for (int part = 0; part < nparts; ++part) {
          const int64_t col = cols[part][0], ncol = nparts == 1 ? Gp : nj;
          for (int64_t j = 0; j < k - 1; ++j) {
            const int64_t slot = ((t - (k - 1 - j) * d) % m + m) % m;
            const float* x = buf + (slot * B + b0) * R;
            if (j == 0)
              matvec<false>(Wg + j * Rp * Gp + col, Gp, R, ncol, x, R, nb, bg + col, &g[col], Gp);
            else
              matvec<true>(Wg + j * Rp * Gp + col, Gp, R, ncol, x, R, nb, nullptr, &g[col], Gp);
          }
          matvec<true>(Wg + (k - 1) * Rp * Gp + col, Gp, R, ncol, h.data(), Rp, nb, nullptr, &g[col], Gp);
        }
        // This step's projections for layer l: from the chunk computed above, or given (C == 0).
        const float* cl = C > 0 ? cond + (tl % CT) * nb * LGp + l * G : c.cin + b0 * c.csb + tl * c.cst + l * G;
        const int64_t crow = C > 0 ? LGp : c.csb;
        const int64_t jc = std::min(j1, H);
        for (int64_t r = 0; r < nb; ++r) {
          const float* cb = cl + r * crow;
          float* gb = &g[r * Gp];
          for (int64_t j = j0; j < jc; ++j) {
            gb[j] += cb[j];
            gb[Hp + j] += cb[H + j];
          }
          for (int64_t j = j0; j < j1; j += VW) st(&z[r * Hp + j], v_tanh(ld(gb + j)) * v_sigmoid(ld(gb + Hp + j)));
        }
      }
      // Residual/skip outputs from this thread's channels (the lead thread adds the bias).
      // The residual output of the last layer is never read: only its skip columns are computed.
      const bool last = l == L - 1;
      const int64_t oc = last ? Rp : 0;
      float* op = team.opart.data() + (int64_t)(p * 2 + (l & 1)) * nb * RSp;
      matvec<false>(Wo + j0 * RSp + oc, RSp, nj, RSp - oc, &z[j0], Hp, nb, lead ? bo + oc : nullptr, op + oc, RSp);
      const float* o = op;
      if (np > 1) {
        team.bar.wait();
        o = osum.data();
        for (int64_t r = 0; r < nb; ++r)
          for (int64_t i = r * RSp + oc; i < (r + 1) * RSp; i += VW) {
            vf acc = ld(team.opart.data() + (int64_t)(l & 1) * nb * RSp + i);
            for (int q = 1; q < np; ++q) acc += ld(team.opart.data() + (int64_t)(q * 2 + (l & 1)) * nb * RSp + i);
            st(&osum[i], acc);
          }
      }
      // Every thread has read its taps (the barrier above), so the slot can be overwritten.
      if (lead) {
        float* dst = buf + ((t % m) * B + b0) * R;
        for (int64_t r = 0; r < nb; ++r) std::memcpy(dst + r * R, &h[r * Rp], sizeof(float) * R);
      }
      for (int64_t r = 0; r < nb; ++r) {
        if (!last)
          for (int64_t v = 0; v < Rp; v += VW) st(&h[r * Rp + v], ld(&h[r * Rp + v]) * c_half + ld(o + r * RSp + v));
        if (lead) {
          for (int64_t v = 0; v < Sp; v += VW) {
            vf ov = ld(o + r * RSp + Rp + v);
            st(&skip[r * Sp + v], l == 0 ? ov : ld(&skip[r * Sp + v]) + ov);
          }
        }
      }
    }
    if (lead) {
      const vf zero = bc(0.0f);
      for (int64_t i = 0; i < nb * Sp; i += VW) st(&s0[i], vmax(ld(&skip[i]) * c.skip_scale, zero));
      matvec(w + cfg[C_OFF_H1W], Sp, Sp, Sp, s0.data(), Sp, nb, w + cfg[C_OFF_H1B], s1.data(), Sp);
      for (int64_t i = 0; i < nb * Sp; i += VW) st(&s1[i], vmax(ld(&s1[i]), zero));
      matvec(w + cfg[C_OFF_H2W], Pp, Sp, Pp, s1.data(), Sp, nb, w + cfg[C_OFF_H2B], params.data(), Pp);
      sample_step(c, team, tl, params.data(), Pp);
    }
    team.bar.wait();  // the next step needs x_prev
  }
}

}  // namespace

extern "C" {

int fg_abi_version() { return 7; }
int fg_vector_width() { return VW; }
double fg_ndtri(double p) { return ndtri(p); }

// Runs Tb steps starting at absolute step t0, updating the ring buffers,
// x_prev and (with predictors lpc) the LP history lp_hist in place.  Batch rows are split between min(teams, B) independent
// teams of team_size threads each; the threads of a team split the gated
// channels of every layer and meet at a barrier per layer.  Returns 0, or a
// negative code for an invalid configuration.
// bufs: int64 addresses of the L ring buffers.
int fg_run(const float* wts, const int64_t* cfg, const int64_t* bufs, int64_t B, int64_t Tb, int64_t t0,
           const float* cin, int64_t csb, int64_t csc, int64_t cst, const float* noise, int64_t nsb, int64_t nsc,
           int64_t nst, float* x_prev, float* out,
           int64_t osb, int64_t ost, float temperature, float log_scale_min, float skip_scale, float sqrt_half,
           int64_t n_teams, int64_t team_size, float* params_out, const float* lpc, int64_t lsb, int64_t lst,
           int64_t order, float* lp_hist) {
  const int64_t L = cfg[C_L], k = cfg[C_K];
  if (cfg[C_RP] % VW || cfg[C_HP] % VW || cfg[C_SP] % VW || cfg[C_PP] % VW || cfg[C_LGP] % VW) return -1;
  if (k < 2 || L < 1 || B < 1 || Tb < 0) return -2;
  if (cfg[C_DIST] == 0 && cfg[C_NN] != cfg[C_MIX] + 1) return -3;
  if (cfg[C_C] == 0 && csc != 1) return -4;  // given projections: one contiguous row of L*G per step and row
  if (lpc && (order < 0 || (order > 0 && !lp_hist))) return -5;
  if (Tb == 0) return 0;
  const int64_t nteams = std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(n_teams, B), 256));
  const int64_t per_team = std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(team_size, 64), cfg[C_HP] / VW));
  std::vector<float*> bp(L);
  for (int64_t l = 0; l < L; ++l) bp[l] = reinterpret_cast<float*>(static_cast<intptr_t>(bufs[l]));
  const Ctx c{wts, cfg, bp.data(), B, Tb, t0, cin, csb, csc, cst, noise, nsb, nsc, nst, x_prev, out, osb, ost,
              temperature, log_scale_min, skip_scale, sqrt_half, params_out, lpc, lsb, lst, order, lp_hist};
  std::vector<Team> teams(nteams);
  for (int64_t i = 0; i < nteams; ++i) {
    Team& tm = teams[i];
    tm.b0 = B * i / nteams;
    tm.nb = B * (i + 1) / nteams - tm.b0;
    tm.size = (int)per_team;
    tm.bar.n = tm.size;
    tm.opart.assign((size_t)tm.size * 2 * tm.nb * (cfg[C_RP] + cfg[C_SP]), 0.0f);
    tm.ctr.assign((size_t)CT * tm.nb * cfg[C_C], 0.0f);
    tm.cond.assign((size_t)CT * tm.nb * cfg[C_LGP], 0.0f);
  }
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < nteams; ++i)
    for (int p = 0; p < teams[i].size; ++p)
      if (i || p) pool.emplace_back(worker, std::cref(c), std::ref(teams[i]), p);
  worker(c, teams[0], 0);
  for (auto& th : pool) th.join();
  return 0;
}

}  // extern "C"
