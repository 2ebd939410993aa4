// int8 W8A8 on CPUs: the epilogue of torch._int_mm, and a GEMV for decode sizes.
//
// q_int8_epilogue: int32 sums -> the output dtype, scaled by each token's and each
// channel's scale, in one pass instead of four torch ops (float, two products, the cast).
// q_int8_gemv: for a few tokens, the int8 weight streamed once with the sums and the
// epilogue in the same pass (vpdpbusd, four rows at a time). torch._int_mm reached about
// half the memory bandwidth at M = 1 on SmolLM2's shapes.
//
// Both are bit-exact to the torch path: the integer sums are exact in int32 in any order,
// then (float(acc) * xs) * ws in fp32 (two roundings, in that order) and the output dtype
// (bf16: round to nearest even). Built on first use by q.kernels.cpp_build; out_dtype: 0
// float32, 1 bfloat16.
#include <cstdint>
#include <cstring>
#include <vector>

#include "../bf16.h"
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

namespace {

using q_bf16::to_bf16;

template <typename Out>
inline void write(Out* o, int64_t n, float v);
template <>
inline void write(float* o, int64_t n, float v) { o[n] = v; }
template <>
inline void write(uint16_t* o, int64_t n, float v) { o[n] = to_bf16(v); }

// sum_k x[k] * w[k] for one row, exact in int32 (the portable path, vectorized by GCC)
inline int32_t dot_int8(const int8_t* x, const int8_t* w, int64_t K) {
  int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < K; ++i)
    acc += static_cast<int32_t>(static_cast<int16_t>(x[i]) * static_cast<int16_t>(w[i]));
  return acc;
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// vpdpbusd multiplies unsigned by signed bytes, 64 per instruction. The activation codes go
// in as x + 128 (unsigned), which adds 128 * sum_k w[k] to each row's sum: subtracted with
// the weight's row sums (computed once at load). Every term stays exact in int32 (|sum| <=
// 255 * 127 * K). Four rows share each activation load and one reduction at the end.
template <int R>
inline void dot_rows_u8(const uint8_t* xu, const int8_t* w, int64_t K, int32_t* acc) {
  __m512i a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // a cache line of each row per step
    const __m512i xv = _mm512_loadu_si512(xu + k);
    for (int r = 0; r < R; ++r)
      a[r] = _mm512_dpbusd_epi32(a[r], xv, _mm512_loadu_si512(w + r * K + k));
  }
  if (k < K) {  // the ragged end: masked loads read zeros, which add nothing
    const __mmask64 mask = _cvtu64_mask64(~0ull >> (64 - (K - k)));
    const __m512i xv = _mm512_maskz_loadu_epi8(mask, xu + k);
    for (int r = 0; r < R; ++r)
      a[r] = _mm512_dpbusd_epi32(a[r], xv, _mm512_maskz_loadu_epi8(mask, w + r * K + k));
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_reduce_add_epi32(a[r]);
}
#endif

template <typename Out>
void gemv(const int8_t* x, const float* xs, const int8_t* w, const float* ws,
          const int32_t* rowsum, Out* out, int64_t M, int64_t N, int64_t K, int threads) {
  const int nt = N * K >= (1 << 18) ? threads : 1;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  constexpr int R = 4;
  std::vector<uint8_t> xu(M * K);  // x + 128, once per call
  for (int64_t i = 0; i < M * K; ++i) xu[i] = static_cast<uint8_t>(x[i] ^ 0x80);
  const int64_t blocks = (N + R - 1) / R;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * R;
    const int rows = static_cast<int>(N - n0 < R ? N - n0 : R);
    for (int64_t m = 0; m < M; ++m) {  // the rows stay in L1 for the other tokens
      int32_t acc[R];
      if (rows == R) {
        dot_rows_u8<R>(xu.data() + m * K, w + n0 * K, K, acc);
      } else {
        for (int r = 0; r < rows; ++r)
          dot_rows_u8<1>(xu.data() + m * K, w + (n0 + r) * K, K, acc + r);
      }
      for (int r = 0; r < rows; ++r) {
        const int32_t exact = acc[r] - 128 * rowsum[n0 + r];
        write(out + m * N, n0 + r, (static_cast<float>(exact) * xs[m]) * ws[n0 + r]);
      }
    }
  }
#else
  (void)rowsum;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int32_t acc = dot_int8(x + m * K, row, K);
      write(out + m * N, n, (static_cast<float>(acc) * xs[m]) * ws[n]);
    }
  }
#endif
}

}  // namespace

extern "C" int q_int8_epilogue(int out_dtype, const int32_t* acc, const float* xs,
                               const float* ws, void* out, int64_t M, int64_t N,
                               int threads) {
  if (out_dtype != 0 && out_dtype != 1) return 1;
  const int nt = M * N >= (1 << 16) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t m = 0; m < M; ++m) {
    const int32_t* a = acc + m * N;
    const float x = xs[m];
    if (out_dtype == 0) {
      float* o = static_cast<float*>(out) + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] = (static_cast<float>(a[n]) * x) * ws[n];
    } else {
      uint16_t* o = static_cast<uint16_t*>(out) + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] = to_bf16((static_cast<float>(a[n]) * x) * ws[n]);
    }
  }
  return 0;
}

// x [M, K] int8 codes with scales xs [M]; w [N, K] int8 with scales ws [N] and row sums
// rowsum [N] (int32, sum_k w[n, k]); out [M, N].
extern "C" int q_int8_gemv(int out_dtype, const int8_t* x, const float* xs, const int8_t* w,
                           const float* ws, const int32_t* rowsum, void* out, int64_t M,
                           int64_t N, int64_t K, int threads) {
  if (out_dtype == 0) {
    gemv(x, xs, w, ws, rowsum, static_cast<float*>(out), M, N, K, threads);
  } else if (out_dtype == 1) {
    gemv(x, xs, w, ws, rowsum, static_cast<uint16_t*>(out), M, N, K, threads);
  } else {
    return 1;
  }
  return 0;
}
