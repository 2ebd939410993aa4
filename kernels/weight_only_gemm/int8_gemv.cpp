// Weight-only int8 GEMV on CPUs: bf16 (or fp32) activations times int8 weights with one
// scale per output channel, for decode sizes (a few tokens).
//
// torch's _weight_int8pack_mm converts and multiplies at about 13 GB/s of weights on this
// project's 2-core AMX Xeon, where its bf16 GEMM streams 18 (tests/bench/tune_kernels_cpu.py):
// at M = 1 the int8 weight, half the bytes, bought only 1.5x. Here four rows share each
// activation load, the codes widen to fp32 in registers (vpmovsxbd, vcvtdq2ps) and meet
// the activations in fp32 FMAs, so the loop is bound by memory, not by the conversion.
//
// y[m, n] = (sum_k x[m, k] * code[n, k]) * scale[n]: the sum in fp32 (16 lanes, then a
// tree), one product by the scale, then the output dtype (bf16: round to nearest even).
// Not bit-identical to _weight_int8pack_mm (another summation order): within fp32
// rounding of the fp32 reference. Built on first use by q.kernels.cpp_build; dtype: 0
// float32, 1 bfloat16 (activations and output).
#include <cstdint>
#include <cstring>
#include <vector>

#include "../bf16.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using q_bf16::from_bf16;
using q_bf16::to_bf16;

#if defined(__AVX512F__)
// bytes ahead that each row's next line is asked for (with the weights coming from memory,
// 512 and 1024 tied and beat none, 256 and 2048 in an A/B of this session)
constexpr int64_t PF = 512;
template <int R>
inline void dot_rows(const float* x, const int8_t* w, int64_t K, float* out) {
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {  // a cache line of each row per step, the next asked for
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + PF),
                                             _MM_HINT_T0);
    for (int j = 0; j < 64; j += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k + j);
      for (int r = 0; r < R; ++r) {
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k + j));
        a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), xv, a[r]);
      }
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), xv, a[r]);
    }
  }
  if (k < K) {  // the ragged end: masked loads read zeros, which add nothing
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
    for (int r = 0; r < R; ++r) {
      const __m128i c = _mm_maskz_loadu_epi8(mask, w + r * K + k);
      a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), xv, a[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(a[r]);
}
#else
template <int R>
inline void dot_rows(const float* x, const int8_t* w, int64_t K, float* out) {
  for (int r = 0; r < R; ++r) {
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < K; ++k) acc += x[k] * static_cast<float>(w[r * K + k]);
    out[r] = acc;
  }
}
#endif

template <typename Out>
inline void store(Out* o, float v);
template <>
inline void store(float* o, float v) { *o = v; }
template <>
inline void store(uint16_t* o, float v) { *o = to_bf16(v); }

template <typename Out>
void gemv(const float* x, const int8_t* w, const float* scale, Out* out, int64_t M, int64_t N,
          int64_t K, int threads) {
  constexpr int R = 4;
  const int nt = N * K >= (1 << 18) ? threads : 1;
  const int64_t blocks = (N + R - 1) / R;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * R;
    const int rows = static_cast<int>(N - n0 < R ? N - n0 : R);
    for (int64_t m = 0; m < M; ++m) {  // the rows stay in L1 for the other tokens
      float acc[R];
      if (rows == R) {
        dot_rows<R>(x + m * K, w + n0 * K, K, acc);
      } else {
        for (int r = 0; r < rows; ++r) dot_rows<1>(x + m * K, w + (n0 + r) * K, K, acc + r);
      }
      for (int r = 0; r < rows; ++r) store(out + m * N + n0 + r, acc[r] * scale[n0 + r]);
    }
  }
}

}  // namespace

// x [M, K] (dtype), w [N, K] int8 codes, scale [N] fp32; out [M, N] (dtype).
extern "C" int q_int8_weight_gemv(int dtype, const void* x, const int8_t* w, const float* scale,
                                  void* out, int64_t M, int64_t N, int64_t K, int threads) {
  if (dtype == 0) {
    gemv(static_cast<const float*>(x), w, scale, static_cast<float*>(out), M, N, K, threads);
    return 0;
  }
  if (dtype != 1) return 1;
  std::vector<float> xf(M * K);  // the activations widened once per call
  const uint16_t* xb = static_cast<const uint16_t*>(x);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = from_bf16(xb[i]);
  gemv(xf.data(), w, scale, static_cast<uint16_t*>(out), M, N, K, threads);
  return 0;
}
