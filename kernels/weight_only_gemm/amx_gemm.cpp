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
// Up to kRegisterTokens (32) tokens the same layout is read without tiles (register_path:
// the codes widened to int16 against 16-bit fixed-point activations in vpdpwssd, 8 tokens
// per pass over each strip); from 33 on, tdpbf16ps, 32 tokens per pass over a strip widened
// once (on CPUs without tiles, vdpbf16ps 8 tokens per pass: amx_tiles.h's bf16_gemm).
//
// y[m, n] = (sum_k x[m, k] * code[n, k]) * scale[n]: from 33 tokens, bf16 products (the
// codes are exact in bf16) summed in fp32; up to 32, exact integer sums per block of the
// activations in fixed point (see few_tokens_strip); then one product by the scale, rounded
// to bf16. N % 16 == 0, K % 32 == 0. The process must have been granted AMX state
// (q_amx_init) once.
#if !defined(__AVX512BF16__) || !defined(__AVX512VNNI__) || \
    (defined(__AMX_TILE__) && !defined(__AMX_BF16__))
#error "this CPU has no AVX-512 BF16 and VNNI (or the compiler does not target them)"
#endif
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../amx_tiles.h"
#include "../packed_call.h"

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

// Up to 8 tokens of a strip: no tiles and no bf16. Each 32-code row of a strip (16 channels x the
// pair k = 2r, 2r + 1) widens to int16 in one instruction and meets each token's activation pair as
// 16-bit integers (amx_tiles.h's to_fixed_point) in vpdpwssd: the channel's two products, summed
// exactly in int32 over a block of kBlock values, then to fp32 once per block times the block's
// unit. Integer sums have no order, so a token's numbers do not depend on the batch. The weight is
// read once. U rows per iteration, one accumulator each, so that a single token has U independent
// chains of vpdpwssd. Against the fp32-FMA loop this path replaced (codes widened to fp32), over a
// 1.1B step's weights on a 2-core AMD EPYC: the same at 1 token (both stream at the memory's pace),
// 1.4x at 4, 1.7-1.8x at 5-8 where the vdpbf16ps loop ran (tests/bench/bench_decode_gemms_cpu.py,
// docs/benchmarks.md).
constexpr int64_t kBlock = 128;  // |sum| <= 128 * 128 * 2^15 = 2^29 per lane: fits int32
constexpr int kFewTokens = 8;    // tokens per pass of the register path
// Tokens the register path takes (q_wo_int8_register_tokens): each pass after a strip's
// first reads it from the core's cache, and its conversions cost less than widening the
// strip to bf16 for the tile or vdpbf16ps loop while the weights stream from memory. Over a
// 1.1B step's weights on a 2-core AMD EPYC, wint8 over bf16, this path against the widened
// one: 0.86-0.94 against 1.26-1.29 at 16 tokens, 1.03 against 1.10-1.13 at 32, 1.05-1.09
// against 1.08-1.16 at 48, behind from 96; over SmolLM2's (small enough to stay in cache
// longer) 0.73-0.77 against 1.18-1.22 at 9, 0.86-0.96 against 1.14 at 16, 0.99-1.16 against
// 1.07-1.09 at 32, 1.17 against 1.06 at 48 (tests/bench/bench_decode_gemms_cpu.py,
// alternated builds)
constexpr int64_t kRegisterTokens = 32;

template <int M>
void few_tokens_strip(const q_amx::FixedPoint& a, int64_t m0, const int8_t* src,
                      const float* scale, uint16_t* out, int64_t N, int64_t K) {
  constexpr int U = M == 1 ? 4 : M <= 4 ? 2 : 1;  // U * M accumulators: 8 at most
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_si512();
    const int64_t end = std::min(K, (b + 1) * kBlock) / 2;  // rows: K % 32 == 0, so U | rows
    for (int64_t r = b * kBlock / 2; r < end; r += U) {
      // 4 KB ahead: 1 KB left the fp32 version of this loop 12% behind the plain-layout GEMV
      for (int u = 0; u < U; u += 2)
        _mm_prefetch(reinterpret_cast<const char*>(src + (r + u) * 32 + 4096), _MM_HINT_T0);
      for (int u = 0; u < U; ++u) {
        const __m512i w = _mm512_cvtepi8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (r + u) * 32)));
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm512_dpwssd_epi32(acc[m][u], w,
                                          q_amx::pair_at(a.x.data() + (m0 + m) * K + 2 * (r + u)));
      }
    }
    for (int m = 0; m < M; ++m) {
      __m512i d = acc[m][0];
      for (int u = 1; u < U; ++u) d = _mm512_add_epi32(d, acc[m][u]);
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d),
                                 _mm512_set1_ps(a.unit[(m0 + m) * blocks + b]), total[m]);
    }
  }
  const __m512 sc = _mm512_loadu_ps(scale);
  for (int m = 0; m < M; ++m) {
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(total[m], sc));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N), (__m256i)y);
  }
}

// Up to kRegisterTokens tokens: passes of up to kFewTokens over each strip in turn
void register_path(const uint16_t* xb, const int8_t* codes, const float* scale, uint16_t* out,
                   int64_t M, int64_t N, int64_t K, int threads) {
  const q_amx::FixedPoint a = q_amx::to_fixed_point(xb, M, K, kBlock);  // once per call
  q_amx::for_strip_passes<kFewTokens>(N, K, M, threads, [&](int64_t s, int64_t m0, auto r) {
    few_tokens_strip<decltype(r)::value>(a, m0, codes + s * K * 16, scale + s * 16,
                                         out + m0 * N + s * 16, N, K);
  });
}

}  // namespace

// 0 when this process may use AMX tiles (or runs without them)
extern "C" int q_amx_init() { return q_amx::request_permission(); }

// kRegisterTokens, for cpp_impl.register_tokens (the tests' batch-invariance checks)
extern "C" int q_wo_int8_register_tokens() { return static_cast<int>(kRegisterTokens); }

// x [M, K] bf16, codes in the layout above, scale [N] fp32; out [M, N] bf16.
extern "C" int q_wo_int8_amx(const uint16_t* x, const int8_t* codes, const float* scale,
                             uint16_t* out, int64_t M, int64_t N, int64_t K, int threads) {
  if (N % 16 || K % 32 || M < 1) return 1;
  if (M <= kRegisterTokens) {  // no AMX state needed
    register_path(x, codes, scale, out, M, N, K, threads);
    return 0;
  }
  q_amx::bf16_gemm(
      x, M, K, N / 16, K * 32, threads, K * 16,
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

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_wo_int8_amx)
