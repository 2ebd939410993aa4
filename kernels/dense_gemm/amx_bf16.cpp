// bf16 GEMM y = x W^T (+ b) on AMX-BF16 tiles (AVX-512 BF16 registers on CPUs without
// tiles), the weight read in place from the B-operand layout it is kept in, for any number
// of tokens.
//
// Why: oneDNN's prepacked bf16 Linear streamed a 1.1B model's weights at 13 GB/s at 32
// tokens against 18 at 1 (tests/bench/bench_decode_gemms_cpu.py); here each 16-channel
// strip is read once per 32 tokens straight into tiles.
//
// Layout (made once at load by cpp_impl.to_amx_bf16_layout): W [N / 16][K / 2][16][2]
// bf16: per block of 16 output channels, row r holds the pairs (k = 2r, 2r + 1) of the 16
// channels in turn, the B operand of tdpbf16ps (a 16 x 64-byte tile covers K = 32).
//
// Up to 4 tokens, no tiles: each 64-byte row meets each token's activation pair, broadcast,
// in vdpbf16ps, 16 channels per accumulator. From 5 tokens on, tdpbf16ps, 32 tokens per
// pass, or without tiles the same vdpbf16ps 8 tokens per pass (amx_tiles.h's bf16_gemm).
// bf16 products summed in fp32, the bias (fp32) added, rounded to bf16 (nearest even).
// N % 16 == 0, K % 32 == 0.
#if !defined(__AVX512BF16__) || (defined(__AMX_TILE__) && !defined(__AMX_BF16__))
#error "this CPU has no AVX-512 BF16 (or the compiler does not target it)"
#endif
#include <cstdint>
#include <cstring>

#include "../amx_tiles.h"
#include "../packed_call.h"

namespace {

inline void store16(__m512 sums, const float* bias, uint16_t* out) {
  if (bias != nullptr) sums = _mm512_add_ps(sums, _mm512_loadu_ps(bias));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(sums));
}

// Up to 4 tokens on one strip, U rows per iteration into accumulators of their own
template <int M, int U = (M <= 2 ? 4 : 2)>
void few_tokens_strip(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* out,
                      int64_t N, int64_t K) {
  __m512 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  for (int64_t r = 0; r < K / 2; r += U) {  // K / 2 % 16 == 0
    for (int u = 0; u < U; ++u) {
      // 4 KB ahead, one line (one row) each
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + u) * 32 + 2048), _MM_HINT_T0);
      const __m512bh row = (__m512bh)_mm512_loadu_si512(w + (r + u) * 32);
      for (int m = 0; m < M; ++m) {
        int32_t pair;  // (x[2r], x[2r + 1]) of this token
        std::memcpy(&pair, x + m * K + 2 * (r + u), sizeof pair);
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_set1_epi32(pair), row);
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sums = acc[m][0];
    for (int u = 1; u < U; ++u) sums = _mm512_add_ps(sums, acc[m][u]);
    store16(sums, bias, out + m * N);
  }
}

template <int M>
void few_tokens(const uint16_t* x, const uint16_t* w, const float* bias, uint16_t* out,
                int64_t N, int64_t K, int threads) {
  q_amx::for_strips(N, K, threads, [&](int64_t s) {
    few_tokens_strip<M>(x, w + s * K * 16, bias == nullptr ? nullptr : bias + s * 16,
                        out + s * 16, N, K);
  });
}

}  // namespace

// 0 when this process may use AMX tiles (or runs without them)
extern "C" int q_amx_bf16_init() { return q_amx::request_permission(); }

// x [M, K] bf16, w in the layout above, bias [N] fp32 or null; out [M, N] bf16.
extern "C" int q_bf16_amx(const uint16_t* x, const uint16_t* w, const float* bias,
                          uint16_t* out, int64_t M, int64_t N, int64_t K, int threads) {
  if (N % 16 || K % 32 || M < 1) return 1;
  if (q_amx::few_tokens(M, [&](auto m) {  // the register path (no AMX state needed)
        few_tokens<decltype(m)::value>(x, w, bias, out, N, K, threads);
      }))
    return 0;
  q_amx::bf16_gemm(
      x, M, K, N / 16, 0, threads, K * 32,
      [&](int64_t s, char*) { return reinterpret_cast<const char*>(w + s * K * 16); },
      [&](const char* sums, int64_t m, int64_t s) {
        store16(_mm512_load_ps(reinterpret_cast<const float*>(sums)),
                bias == nullptr ? nullptr : bias + s * 16, out + m * N + s * 16);
      });
  return 0;
}

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_bf16_amx)
