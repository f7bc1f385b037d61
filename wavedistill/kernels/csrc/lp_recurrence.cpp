// Linear-prediction synthesis recurrence with per-frame coefficients, and its adjoint.
//
// Forward (LP synthesis, an all-pole filter):
//   y[t] = e[t] + sum_k a[f(t), k] * y[t-1-k],   k < p,
// with y[-1-k] = hist[k] (the signal before t = 0, most recent first; zeros when hist is null).
// Adjoint (the gradient w.r.t. e, the same recurrence backwards in time with transposed coefficients):
//   g_e[t] = g_y[t] + sum_k a[f(t+1+k), k] * g_e[t+1+k],   t+1+k < T.
// Frame of sample t: f(t) = clamp(floor((start + t + hop/2) / hop), 0, F-1) (nearest frame centre,
// frame i centred at sample i*hop of the coefficients' own timeline).
//
// Plain C ABI (ctypes releases the GIL); rows are independent.  Layout: e, y, g: [B, T] contiguous;
// a: [B or 1, F, p] contiguous (a_rows = B or 1); hist: [B, p] or null.

#include <algorithm>
#include <cstdint>

namespace {

inline int64_t frame_of(int64_t t, int64_t start, int64_t hop, int64_t F) {
  int64_t n = start + t + hop / 2;
  int64_t f = n >= 0 ? n / hop : -((-n + hop - 1) / hop);
  return std::min(std::max<int64_t>(f, 0), F - 1);
}

template <typename T>
void forward(const T* e, const T* a, const T* hist, T* y, int64_t B, int64_t n, int64_t a_rows, int64_t F,
             int64_t p, int64_t hop, int64_t start) {
  for (int64_t b = 0; b < B; ++b) {
    const T* eb = e + b * n;
    const T* ab = a + (a_rows == 1 ? 0 : b) * F * p;
    const T* hb = hist ? hist + b * p : nullptr;
    T* yb = y + b * n;
    const int64_t head = std::min(n, p);
    for (int64_t t = 0; t < head; ++t) {  // reads the history
      const T* af = ab + frame_of(t, start, hop, F) * p;
      T acc = eb[t];
      for (int64_t k = 0; k < p; ++k) {
        const int64_t s = t - 1 - k;
        const T v = s >= 0 ? yb[s] : (hb ? hb[-s - 1] : T(0));
        acc += af[k] * v;
      }
      yb[t] = acc;
    }
    int64_t t = head;
    while (t < n) {  // one frame's run of samples at a time: the coefficients stay in registers
      const int64_t f = frame_of(t, start, hop, F);
      int64_t stop = n;
      if (f < F - 1) stop = std::min(n, (f + 1) * hop - hop / 2 - start);  // first sample of frame f+1
      stop = std::max(stop, t + 1);
      const T* af = ab + f * p;
      for (; t < stop; ++t) {
        const T* yp = yb + t - 1;
        T acc = eb[t];
        for (int64_t k = 0; k < p; ++k) acc += af[k] * yp[-k];
        yb[t] = acc;
      }
    }
  }
}

template <typename T>
void adjoint(const T* g, const T* a, T* ge, int64_t B, int64_t n, int64_t a_rows, int64_t F, int64_t p,
             int64_t hop, int64_t start) {
  for (int64_t b = 0; b < B; ++b) {
    const T* gb = g + b * n;
    const T* ab = a + (a_rows == 1 ? 0 : b) * F * p;
    T* eb = ge + b * n;
    for (int64_t t = n - 1; t >= 0; --t) {
      T acc = gb[t];
      const int64_t kmax = std::min(p, n - 1 - t);
      if (kmax == p && frame_of(t + 1, start, hop, F) == frame_of(t + p, start, hop, F)) {
        const T* af = ab + frame_of(t + 1, start, hop, F) * p;
        const T* ep = eb + t + 1;
        for (int64_t k = 0; k < p; ++k) acc += af[k] * ep[k];
      } else {
        for (int64_t k = 0; k < kmax; ++k) acc += ab[frame_of(t + 1 + k, start, hop, F) * p + k] * eb[t + 1 + k];
      }
      eb[t] = acc;
    }
  }
}

}  // namespace

extern "C" {

int lpr_abi_version() { return 1; }

void lpr_forward_f32(const float* e, const float* a, const float* hist, float* y, int64_t B, int64_t n,
                     int64_t a_rows, int64_t F, int64_t p, int64_t hop, int64_t start) {
  forward<float>(e, a, hist, y, B, n, a_rows, F, p, hop, start);
}
void lpr_forward_f64(const double* e, const double* a, const double* hist, double* y, int64_t B, int64_t n,
                     int64_t a_rows, int64_t F, int64_t p, int64_t hop, int64_t start) {
  forward<double>(e, a, hist, y, B, n, a_rows, F, p, hop, start);
}
void lpr_adjoint_f32(const float* g, const float* a, float* ge, int64_t B, int64_t n, int64_t a_rows, int64_t F,
                     int64_t p, int64_t hop, int64_t start) {
  adjoint<float>(g, a, ge, B, n, a_rows, F, p, hop, start);
}
void lpr_adjoint_f64(const double* g, const double* a, double* ge, int64_t B, int64_t n, int64_t a_rows, int64_t F,
                     int64_t p, int64_t hop, int64_t start) {
  adjoint<double>(g, a, ge, B, n, a_rows, F, p, hop, start);
}

}  // extern "C"
