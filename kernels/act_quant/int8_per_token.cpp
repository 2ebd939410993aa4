// Dynamic per-token int8 quantization of activations, for CPUs: one pass per row instead of
// the reference's dozen torch ops (float, abs, amax, clamp, two divisions, round, clamp,
// cast, ...), which at decode sizes cost far more in dispatch than in arithmetic.
//
// Bit-exact to reference.quantize_activation(x, None, int8): amax is exact in any order;
// s = max(amax, 1e-10) / 127 and q = x / s are IEEE fp32 divisions (this file is built
// without -ffast-math, so no reciprocal multiply), clamped to +-127 and rounded half to
// even (as torch.round; clamping first gives the same codes, the bounds being integers).
//
// dtype: 0 float32, 1 bfloat16. x rows are `stride` elements apart; codes [M, K] int8 and
// scales [M] fp32 are contiguous. Built on first use by q.kernels.cpp_build.
#include <cmath>
#include <cstdint>
#include <cstring>
#include "../packed_call.h"

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

constexpr int64_t CHUNK = 64;
// 1.5 * 2^23: adding and subtracting it rounds |v| < 2^22 half to even (the default
// rounding mode, as torch.round); std::nearbyint and std::fmin do not vectorize here
constexpr float ROUNDER = 12582912.f;

template <typename T>
void quantize(const T* x, int64_t stride, int8_t* codes, float* scales, int64_t rows,
              int64_t K, int threads) {
  const int nt = rows * K >= (1 << 16) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * stride;
    int8_t* q = codes + r * K;
    float lanes[16] = {};  // partial maxima: GCC vectorizes this, not a max reduction
    int64_t i = 0;
    for (; i + 16 <= K; i += 16)
      for (int j = 0; j < 16; ++j) {
        const float a = std::fabs(load(xr, i + j));
        lanes[j] = a > lanes[j] ? a : lanes[j];
      }
    float amax = 0.f;
    for (; i < K; ++i) amax = std::fmax(amax, std::fabs(load(xr, i)));
    for (int j = 0; j < 16; ++j) amax = std::fmax(amax, lanes[j]);
    const float s = std::fmax(amax, 1e-10f) / 127.f;
    scales[r] = s;
    int32_t staged[CHUNK];  // float -> int32 -> int8 in two loops: GCC vectorizes each
    for (int64_t i0 = 0; i0 < K; i0 += CHUNK) {  // but not the two-step narrowing in one
      const int64_t n = K - i0 < CHUNK ? K - i0 : CHUNK;
      for (int64_t i = 0; i < n; ++i) {
        float v = load(xr, i0 + i) / s;
        v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);  // clamp, then round: the same
        staged[i] = static_cast<int32_t>((v + ROUNDER) - ROUNDER);  // codes (integer bounds)
      }
      for (int64_t i = 0; i < n; ++i) q[i0 + i] = static_cast<int8_t>(staged[i]);
    }
  }
}

}  // namespace

extern "C" int q_quantize_int8_per_token(int dtype, const void* x, int64_t stride,
                                         int8_t* codes, float* scales, int64_t rows,
                                         int64_t K, int threads) {
  if (dtype == 0) {
    quantize(static_cast<const float*>(x), stride, codes, scales, rows, K, threads);
  } else if (dtype == 1) {
    quantize(static_cast<const uint16_t*>(x), stride, codes, scales, rows, K, threads);
  } else {
    return 1;
  }
  return 0;
}

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_quantize_int8_per_token)
