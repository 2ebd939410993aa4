// Weight-only int8 GEMM on AMX-BF16 tiles, for any number of tokens: the int8 weight is read
// once per call at its own size, widened to bf16 a strip at a time in the core's cache, and
// multiplied there by tdpbf16ps.
//
// Why: torch's packed int8 kernel is a GEMV run once per token, and dequantizing the whole
// weight for a call writes and reads back a bf16 copy: with the weights streaming from
// memory the first ran 1.3-1.6x bf16 GEMM's time at 8 tokens and 3-4x at 32, the second
// 4-5x (tests/bench/bench_decode_gemms_cpu.py).
//
// Layout (made once at load by cpp_impl.to_amx_layout): codes [N / 16][K / 2][16][2] int8,
// i.e. for each block of 16 output channels, row r holds the code pairs (k = 2r, 2r + 1) of
// the 16 channels in turn: widened to bf16 it is exactly the B operand AMX's tdpbf16ps
// reads (a 16 x 64-byte tile covers K = 32). Scales [N] fp32 (one per channel).
//
// Up to 4 tokens the same layout is read without tiles (few_tokens: fp32 FMAs on registers
// of widened codes); from 5 on, tdpbf16ps, 32 tokens per pass over a strip widened once
// (on CPUs without tiles, vdpbf16ps 8 tokens per pass: amx_tiles.h's bf16_gemm).
//
// y[m, n] = (sum_k x[m, k] * code[n, k]) * scale[n]: bf16 products (the codes are exact in
// bf16) summed in fp32, one product by the scale, rounded to bf16. N % 16 == 0, K % 32 ==
// 0. The process must have been granted AMX state (q_amx_init) once.
#if !defined(__AVX512BF16__) || (defined(__AMX_TILE__) && !defined(__AMX_BF16__))
#error "this CPU has no AVX-512 BF16 (or the compiler does not target it)"
#endif
#include <cstdint>
#include <cstring>
#include <vector>

#include "../amx_tiles.h"

namespace {

// 16 sums times their channels' scales, rounded to bf16 (nearest even)
inline void store_row(const float* acc, __m512 scale, uint16_t* out) {
  const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc), scale));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)y);
}

// one 16-channel strip of codes (K / 2 rows of 32 bytes) -> bf16, the same layout
inline void widen_strip(const int8_t* src, uint16_t* dst, int64_t K) {
  for (int64_t r = 0; r < K / 2; ++r) {
    if ((r & 1) == 0)  // the next lines of this strip while these convert
      _mm_prefetch(reinterpret_cast<const char*>(src + r * 32 + 1024), _MM_HINT_T0);
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 32));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
    _mm512_store_si512(dst + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Up to 4 tokens: no tiles. Each 32-code row of a strip (16 channels x the pair k = 2r,
// 2r + 1) widens to fp32 in two registers and meets the activation pair, broadcast, in fp32
// FMAs; the pair's two lanes per channel are added at the end. The weight is read once.
template <int M>
void few_tokens_strip(const float* x, const int8_t* src, const float* scale, uint16_t* out,
                      int64_t N, int64_t K) {
  __m512 lo[M], hi[M];  // channels 0-7 and 8-15, two lanes each (k even, k odd)
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  for (int64_t r = 0; r < K / 2; ++r) {
    if ((r & 1) == 0)  // 4 KB ahead: 1 KB left it 12% behind the plain-layout GEMV at M = 1
      _mm_prefetch(reinterpret_cast<const char*>(src + r * 32 + 4096), _MM_HINT_T0);
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 32));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
    for (int m = 0; m < M; ++m) {
      double pair;  // (x[2r], x[2r + 1]) as one 64-bit lane, broadcast
      std::memcpy(&pair, x + m * K + 2 * r, sizeof pair);
      const __m512 xv = _mm512_castpd_ps(_mm512_set1_pd(pair));
      lo[m] = _mm512_fmadd_ps(w0, xv, lo[m]);
      hi[m] = _mm512_fmadd_ps(w1, xv, hi[m]);
    }
  }
  const __m512 sc = _mm512_loadu_ps(scale);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                          28, 30);
  for (int m = 0; m < M; ++m) {  // lane 2i + lane 2i+1 -> channel i
    const __m512 a = _mm512_add_ps(lo[m], _mm512_permute_ps(lo[m], 0xB1));
    const __m512 b = _mm512_add_ps(hi[m], _mm512_permute_ps(hi[m], 0xB1));
    const __m512 sums = _mm512_permutex2var_ps(a, evens, b);
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(sums, sc));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N), (__m256i)y);
  }
}

template <int M>
void few_tokens(const uint16_t* xb, const int8_t* codes, const float* scale, uint16_t* out,
                int64_t N, int64_t K, int threads) {
  const std::vector<float> x = q_amx::widen_bf16(xb, M * K);  // once per call
  q_amx::for_strips(N, K, threads, [&](int64_t s) {
    few_tokens_strip<M>(x.data(), codes + s * K * 16, scale + s * 16, out + s * 16, N, K);
  });
}

}  // namespace

// 0 when this process may use AMX tiles (or runs without them)
extern "C" int q_amx_init() { return q_amx::request_permission(); }

// x [M, K] bf16, codes in the layout above, scale [N] fp32; out [M, N] bf16.
extern "C" int q_wo_int8_amx(const uint16_t* x, const int8_t* codes, const float* scale,
                             uint16_t* out, int64_t M, int64_t N, int64_t K, int threads) {
  if (N % 16 || K % 32 || M < 1) return 1;
  if (q_amx::few_tokens(M, [&](auto m) {  // the register path (no AMX state needed)
        few_tokens<decltype(m)::value>(x, codes, scale, out, N, K, threads);
      }))
    return 0;
  q_amx::bf16_gemm(
      x, M, K, N / 16, K * 32, threads,
      [&](int64_t s, char* buffer) {
        uint16_t* strip = reinterpret_cast<uint16_t*>(buffer);
        widen_strip(codes + s * K * 16, strip, K);
        return static_cast<const char*>(buffer);
      },
      [&](const char* sums, int64_t m, int64_t s) {
        store_row(reinterpret_cast<const float*>(sums), _mm512_loadu_ps(scale + s * 16),
                  out + m * N + s * 16);
      });
  return 0;
}
