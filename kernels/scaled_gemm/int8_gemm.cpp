// int8 W8A8 on CPUs: the epilogue of torch._int_mm, and a GEMV for decode sizes.
//
// q_int8_epilogue: int32 sums -> the output dtype, scaled by each token's and each
// channel's scale, in one pass instead of four torch ops (float, two products, the cast).
// q_int8_gemv: for a few tokens, the int8 weight streamed once with the sums and the
// epilogue in the same pass. torch._int_mm reached about half the memory bandwidth at
// M = 1 on SmolLM2's shapes (tests/bench/bench_int8_gemv.py has both).
//
// Both are bit-exact to the torch path: the integer sums are exact in int32 in any order,
// then (float(acc) * xs) * ws in fp32 (two roundings, in that order) and the output dtype
// (bf16: round to nearest even). Built on first use by q.kernels.cpp_build; out_dtype: 0
// float32, 1 bfloat16.
#include <cstdint>
#include <cstring>
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

namespace {

inline uint16_t to_bf16(float v) {  // round to nearest even; NaN stays NaN (branch-free)
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

template <typename Out>
inline void write(Out* o, int64_t n, float v);
template <>
inline void write(float* o, int64_t n, float v) { o[n] = v; }
template <>
inline void write(uint16_t* o, int64_t n, float v) { o[n] = to_bf16(v); }

// sum_k x[k] * w[k], exact in int32 (|x|, |w| <= 127: each pairwise sum fits easily)
inline int32_t dot_int8(const int8_t* x, const int8_t* w, int64_t K) {
  int64_t k = 0;
  int32_t acc = 0;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  // 32 codes per step, sign-extended to int16 and multiplied pairwise into int32 lanes
  __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
  for (; k + 64 <= K; k += 64) {
    const __m512i x0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(x + k)));
    const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + k)));
    const __m512i x1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(x + k + 32)));
    const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + k + 32)));
    a0 = _mm512_dpwssd_epi32(a0, x0, w0);
    a1 = _mm512_dpwssd_epi32(a1, x1, w1);
  }
  acc = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
#endif
  const int64_t done = k;  // the rest (or all, without AVX-512 VNNI), vectorized by GCC
#pragma omp simd reduction(+ : acc)
  for (int64_t i = done; i < K; ++i)
    acc += static_cast<int32_t>(static_cast<int16_t>(x[i]) * static_cast<int16_t>(w[i]));
  return acc;
}

template <typename Out>
void gemv(const int8_t* x, const float* xs, const int8_t* w, const float* ws, Out* out,
          int64_t M, int64_t N, int64_t K, int threads) {
  const int nt = N * K >= (1 << 18) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* row = w + n * K;
    for (int64_t m = 0; m < M; ++m) {  // the row stays in L1 for the other tokens
      const int32_t acc = dot_int8(x + m * K, row, K);
      write(out + m * N, n, (static_cast<float>(acc) * xs[m]) * ws[n]);
    }
  }
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

// x [M, K] int8 codes with scales xs [M]; w [N, K] int8 with scales ws [N]; out [M, N].
extern "C" int q_int8_gemv(int out_dtype, const int8_t* x, const float* xs, const int8_t* w,
                           const float* ws, void* out, int64_t M, int64_t N, int64_t K,
                           int threads) {
  if (out_dtype == 0) {
    gemv(x, xs, w, ws, static_cast<float*>(out), M, N, K, threads);
  } else if (out_dtype == 1) {
    gemv(x, xs, w, ws, static_cast<uint16_t*>(out), M, N, K, threads);
  } else {
    return 1;
  }
  return 0;
}
