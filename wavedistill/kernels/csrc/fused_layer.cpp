// Element-wise passes of a time-major WaveNet residual stack, fused, for training on the CPU.
//
// Plain C ABI, loaded with ctypes (wavedistill/kernels/cpu_fused.py).  Every array is float32,
// row-major, rows = the B·T samples of a batch; the GEMMs stay in PyTorch (MKL/oneDNN), these
// kernels replace the chains of element-wise ATen ops between them (each of which reads and writes a
// whole [B·T, channels] tensor):
//
//   wf_taps        stacked rows [x_{t-(K-1)d}, ..., x_t, c_t] (zeros before the start): the GEMM operand
//   wf_taps_bwd    g_x[t] = c·g_res[t] + Σ_k g_stacked[t + (K-1-k)d, tap k]  (the adjoint of wf_taps)
//   wf_gate        h ← [tanh(a + a') | σ(b + b')] in place, z = tanh·σ   (a' b': optional addend rows and/or
//                  a frame-rate conditioning projection upsampled on the fly through a banded linear map)
//   wf_band_bwd    the gradients of that banded map (frame-rate projection and band weights)
//   wf_gate_bwd    ts ← [g_z·σ·(1 − tanh²) | g_z·tanh·σ·(1 − σ)] in place (optionally copied to a second array)
//   wf_residual    out = (x + y_res + b_res)·c ; skips (= or +=) y_skip + b_skip
//   wf_pack_gy     g_y = [c·g_x | g_skip]
//
// tanhf/expf vectorise through glibc's libmvec (x86-64, glibc >= 2.35): the declarations below name their
// SIMD variants, which <math.h> does only under -ffast-math (not used: it would change rounding elsewhere
// and, linked into a shared library by some GCC versions, set flush-to-zero for the whole process).
// Where the variants are missing the library does not load and the PyTorch layers run instead.
// Rows are split over `threads` OpenMP threads for large arrays.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__FAST_MATH__)
extern "C" {
__attribute__((simd("notinbranch"))) float expf(float) noexcept;
__attribute__((simd("notinbranch"))) float tanhf(float) noexcept;
}
#endif

namespace {

template <class F>
void parallel_rows(int64_t n, int64_t threads, int64_t row_cost, F fn) {
  // at least ~64k floats of work per thread, so small arrays stay on the calling thread.  OpenMP, not
  // std::thread: the library links the libgomp that PyTorch has loaded, so these passes share the threads
  // of the GEMMs around them instead of competing with them.
  int64_t most = std::max<int64_t>(1, n * std::max<int64_t>(row_cost, 1) / 65536);
  threads = std::max<int64_t>(1, std::min(threads, most));
  if (threads == 1) {
    fn(int64_t(0), n);
    return;
  }
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t i = 0; i < threads; ++i) {
    const int64_t b = i * chunk, e = std::min(n, b + chunk);
    if (b < e) fn(b, e);
  }
}

// Column sums of row blocks, accumulated in double per thread and merged once per thread.
struct ColSum {
  double* out;  // [width], zeroed by the caller
  int64_t width;
  void merge(const std::vector<double>& part) const {
#pragma omp critical(wf_colsum)
    for (int64_t j = 0; j < width; ++j) out[j] += part[j];
  }
};

}  // namespace

extern "C" {

int wf_abi_version() { return 4; }

// out [B·T, ldo]: columns [k·R, (k+1)·R) hold x[b, t - (K-1-k)·d] (0 before t = 0), columns [K·R, K·R + C)
// hold cond[b, t] (cond row stride ldc, batch stride cond_bstride: 0 broadcasts one row set to every b).
void wf_taps(const float* x, const float* cond, int64_t ldc, int64_t cond_bstride, float* out, int64_t ldo,
             int64_t B, int64_t T, int64_t R, int64_t C, int64_t K, int64_t d, int64_t threads) {
  parallel_rows(B * T, threads, K * R + C, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / T, t = i % T;
      float* o = out + i * ldo;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t s = (K - 1 - k) * d;
        float* ok = o + k * R;
        if (t >= s) {
          const float* src = x + (i - s) * R;
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) ok[r] = src[r];
        } else {
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) ok[r] = 0.f;
        }
      }
      if (C > 0) {
        const float* src = cond + b * cond_bstride + t * ldc;
        float* oc = o + K * R;
#pragma omp simd
        for (int64_t r = 0; r < C; ++r) oc[r] = src[r];
      }
    }
  });
}

// gx [B·T, R] = c·gres (if gres) + Σ_k g[t + (K-1-k)·d, k·R : (k+1)·R] (terms past T vanish); g row stride ldg.
void wf_taps_bwd(const float* g, int64_t ldg, const float* gres, float c, float* gx,
                 int64_t B, int64_t T, int64_t R, int64_t K, int64_t d, int64_t threads) {
  parallel_rows(B * T, threads, K * R, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t t = i % T;
      float* o = gx + i * R;
      const float* last = g + i * ldg + (K - 1) * R;  // tap K-1 reads x_t itself
      if (gres != nullptr) {
        const float* gr = gres + i * R;
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) o[r] = c * gr[r] + last[r];
      } else {
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) o[r] = last[r];
      }
      for (int64_t k = 0; k + 1 < K; ++k) {
        const int64_t s = (K - 1 - k) * d;
        if (t + s < T) {
          const float* src = g + (i + s) * ldg + k * R;
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) o[r] += src[r];
        }
      }
    }
  });
}

// h [N, ldh] (first 2H columns used) ← [tanh(a) | σ(b)] with [a | b] = h[:, :2H] (+ bias) (+ add[:, :2H]) (+ the banded
// conditioning below); z [N, H] = tanh(a)·σ(b).  add (row stride ldadd, batch stride add_bs over rows of T) may
// be null.  Banded conditioning (P null: none): row (b, t) adds Σ_{j<J} w[t, j] · P[b, i0[t] + j, :2H], with P's
// frame stride P_ld and batch stride P_bs — a conditioning projection computed at frame rate and upsampled
// by a linear map of band J, applied here instead of materialising the upsampled projection.
void wf_gate(float* h, int64_t ldh, const float* bias, const float* add, int64_t ldadd, int64_t add_bs, const float* P,
             int64_t P_ld, int64_t P_bs, const int64_t* i0, const float* w, int64_t J, float* z, int64_t N, int64_t T,
             int64_t H, int64_t threads) {
  parallel_rows(N, threads, (3 + J) * H, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / T, t = i % T;
      float* a = h + i * ldh;
      float* zi = z + i * H;
      if (bias != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < 2 * H; ++j) a[j] += bias[j];
      }
      if (add != nullptr) {
        const float* ad = add + b * add_bs + t * ldadd;
#pragma omp simd
        for (int64_t j = 0; j < 2 * H; ++j) a[j] += ad[j];
      }
      if (P != nullptr) {
        const float* base = P + b * P_bs + i0[t] * P_ld;
        for (int64_t k = 0; k < J; ++k) {
          const float wk = w[t * J + k];
          const float* pk = base + k * P_ld;
#pragma omp simd
          for (int64_t j = 0; j < 2 * H; ++j) a[j] += wk * pk[j];
        }
      }
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const float t_ = tanhf(a[j]);
        const float s = 1.f / (1.f + expf(-a[H + j]));
        a[j] = t_;
        a[H + j] = s;
        zi[j] = t_ * s;
      }
    }
  });
}

// The adjoint of wf_gate's banded conditioning for one layer: with g [B·T, G] the gradient of the
// pre-activations, gP[b, i0[t] + j, :G] += w[t, j]·g[b, t] and gw[t, j] += <g[b, t], P[b, i0[t] + j, :G]>.
// Parallel over b (each thread its own rows of gP; gw summed from per-thread copies).
void wf_band_bwd(const float* g, const float* P, int64_t P_ld, int64_t P_bs, const int64_t* i0, const float* w,
                 int64_t J, float* gP, float* gw, int64_t B, int64_t T, int64_t G, int64_t threads) {
  threads = std::max<int64_t>(1, std::min(threads, B));
  std::vector<std::vector<float>> part(threads, std::vector<float>(threads > 1 ? T * J : 0, 0.f));
  auto work = [&](int64_t tid) {
    float* acc = threads > 1 ? part[tid].data() : gw;
    for (int64_t b = tid; b < B; b += threads) {
      for (int64_t t = 0; t < T; ++t) {
        const float* gi = g + (b * T + t) * G;
        const int64_t off = b * P_bs + i0[t] * P_ld;
        for (int64_t k = 0; k < J; ++k) {
          const float wk = w[t * J + k];
          const float* pk = P + off + k * P_ld;
          float* gpk = gP + off + k * P_ld;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < G; ++j) {
            gpk[j] += wk * gi[j];
            dot += gi[j] * pk[j];
          }
          acc[t * J + k] += dot;
        }
      }
    }
  };
  if (threads == 1) {
    work(0);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t i = 0; i < threads; ++i) work(i);
  for (int64_t i = 0; i < threads; ++i)
    for (int64_t k = 0; k < T * J; ++k) gw[k] += part[i][k];
}

// ts [N, 2H] = [tanh | σ] from wf_gate ← the gradient of the pre-activations given gz [N, H];
// also written to copy [N, ldcopy] when copy is not null.
void wf_gate_bwd(const float* gz, float* ts, float* copy, int64_t ldcopy, double* colsum, int64_t N, int64_t H,
                 int64_t threads) {
  const ColSum cs{colsum, 2 * H};
  parallel_rows(N, threads, 3 * H, [=](int64_t lo, int64_t hi) {
    std::vector<double> part(colsum != nullptr ? 2 * H : 0, 0.0);
    for (int64_t i = lo; i < hi; ++i) {
      float* a = ts + i * 2 * H;
      const float* g = gz + i * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const float t = a[j], s = a[H + j], gj = g[j];
        a[j] = gj * s * (1.f - t * t);
        a[H + j] = gj * t * s * (1.f - s);
      }
      if (copy != nullptr) {
        float* o = copy + i * ldcopy;
#pragma omp simd
        for (int64_t j = 0; j < 2 * H; ++j) o[j] = a[j];
      }
      if (colsum != nullptr) {
        for (int64_t j = 0; j < 2 * H; ++j) part[j] += a[j];
      }
    }
    if (colsum != nullptr) cs.merge(part);
  });
}

// y [N, ldy]: columns [0, R) the residual projection (if out), then S skip columns; b the matching biases.
// out [N, R] = (x + y_res + b_res)·c (skipped when out is null); skips [N, S]: = (skip_mode 1) or += (2).
void wf_residual(const float* x, const float* y, int64_t ldy, const float* b, float* out, float* skips,
                 int64_t N, int64_t R, int64_t S, float c, int64_t skip_mode, int64_t threads) {
  const int64_t off = out != nullptr ? R : 0;
  parallel_rows(N, threads, off + S, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* yi = y + i * ldy;
      if (out != nullptr) {
        const float* xi = x + i * R;
        float* oi = out + i * R;
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) oi[r] = (xi[r] + yi[r] + b[r]) * c;
      }
      if (skip_mode != 0) {
        float* si = skips + i * S;
        const float* ys = yi + off;
        const float* bs = b + off;
        if (skip_mode == 1) {
#pragma omp simd
          for (int64_t r = 0; r < S; ++r) si[r] = ys[r] + bs[r];
        } else {
#pragma omp simd
          for (int64_t r = 0; r < S; ++r) si[r] += ys[r] + bs[r];
        }
      }
    }
  });
}

// gy [N, R + S] = [c·gx | gs]  (gs may be null when S = 0); colsum (if not null) += the column sums of gy.
void wf_pack_gy(const float* gx, const float* gs, float c, float* gy, double* colsum, int64_t N, int64_t R, int64_t S,
                int64_t threads) {
  const ColSum cs{colsum, R + S};
  parallel_rows(N, threads, R + S, [=](int64_t lo, int64_t hi) {
    std::vector<double> part(colsum != nullptr ? R + S : 0, 0.0);
    for (int64_t i = lo; i < hi; ++i) {
      float* o = gy + i * (R + S);
      const float* g = gx + i * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) o[r] = c * g[r];
      if (S > 0) {
        const float* s = gs + i * S;
#pragma omp simd
        for (int64_t r = 0; r < S; ++r) o[R + r] = s[r];
      }
      if (colsum != nullptr) {
        for (int64_t r = 0; r < R + S; ++r) part[r] += o[r];
      }
    }
    if (colsum != nullptr) cs.merge(part);
  });
}

}  // extern "C"
