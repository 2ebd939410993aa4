// RMSNorm (optionally after the residual add) in one pass, for CPUs.
//
// In torch ops it is six calls (casts, pow, mean, rsqrt, two products): at decode sizes
// each costs more in dispatch than in arithmetic, and for prompts each is one more pass
// over the activations (tests/bench/bench_cpu_small_ops.py: 2-8x). Built on first use by
// q.kernels.cpp_build (-O3 -march=native -fopenmp, no torch headers) and called through
// ctypes from cpp_impl.py.
//
// The roundings follow transformers' LlamaRMSNorm exactly (reference.py is the oracle):
// fp32 arithmetic, the normalized row rounded to the input dtype, then times the weight and
// rounded again. Only the order of the fp32 sum of squares differs from torch's kernels, so
// outputs agree to within one rounding of the input dtype.
//
// dtype: 0 float32, 1 bfloat16. Rows are `stride` elements apart (a column slice of a
// wider product is a valid input); outputs are contiguous.
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline uint16_t to_bf16(float v) {  // round to nearest even; NaN stays NaN (branch-free)
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}
inline void store(uint16_t* p, int64_t i, float v) { p[i] = to_bf16(v); }

inline float round_to(float, float v) { return v; }
inline float round_to(uint16_t, float v) {
  const uint32_t u = static_cast<uint32_t>(to_bf16(v)) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Enough work per thread to pay for waking it (rows x width elements).
inline int threads_for(int64_t elements, int threads) {
  const int64_t per_thread = 1 << 15;
  int64_t useful = elements / per_thread;
  if (useful < 1) useful = 1;
  return useful < threads ? static_cast<int>(useful) : threads;
}

// residual != nullptr: x + residual is formed (rounded to T, as torch's add) and written to
// residual_out before it is normalized.
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* residual, T* residual_out,
              const T* weight, T* out, int64_t rows, int64_t width, float eps, int threads) {
  const int nt = threads_for(rows * width, threads);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    T* yr = out + r * width;
    const T* src = xr;
    if (residual != nullptr) {
      const T* rr = residual + r * width;
      T* ro = residual_out + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) store(ro, i, load(xr, i) + load(rr, i));
      src = ro;
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) {
      const float v = load(src, i);
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(width) + eps);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float normed = round_to(T{}, load(src, i) * inv);
      store(yr, i, load(weight, i) * normed);
    }
  }
}

}  // namespace

extern "C" {

int q_rms_norm(int dtype, const void* x, int64_t x_stride, const void* residual,
               void* residual_out, const void* weight, void* out, int64_t rows,
               int64_t width, float eps, int threads) {
  if (dtype == 0) {
    rms_norm(static_cast<const float*>(x), x_stride, static_cast<const float*>(residual),
             static_cast<float*>(residual_out), static_cast<const float*>(weight),
             static_cast<float*>(out), rows, width, eps, threads);
  } else if (dtype == 1) {
    rms_norm(static_cast<const uint16_t*>(x), x_stride,
             static_cast<const uint16_t*>(residual), static_cast<uint16_t*>(residual_out),
             static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows, width,
             eps, threads);
  } else {
    return 1;
  }
  return 0;
}

}  // extern "C"
