// int8 W8A8 on AMX-INT8 tiles (AVX-512 VNNI registers on CPUs without tiles), for any
// number of tokens: the weight is read once per call at its own size, straight into the
// tiles or registers (no widening), and the int32 sums are exact.
//
// Why: torch._int_mm reorders its weight on every call, which kept it at 100-120 ms for a
// 1.1B model's weights at 1-32 tokens when they stream from memory, no faster than bf16
// (tests/bench/bench_decode_gemms_cpu.py); oneDNN's prepacked int8 Linear avoids that but
// needs its own copy of the weight.
//
// Layout (made once at load by cpp_impl.to_amx_int8_layout): codes [N / 16][K / 4][16][4]
// int8: per block of 16 output channels, row r holds codes k = 4r..4r+3 of the 16 channels
// in turn, the B operand of tdpbssd (a 16 x 64-byte tile covers K = 64).
//
// Up to 4 tokens, no tiles: vpdpbusd with each token's 4 activation codes broadcast (as x +
// 128, unsigned; the weight's row sums take the 128 * sum(w) back out), 16 channels per
// accumulator. From 5 tokens on, tdpbssd, 32 tokens per pass, tokens in L2-sized chunks;
// on CPUs without tiles, the same vpdpbusd 8 tokens per pass (amx_tiles.h's vector_loop).
// Either way the int32 sums are exact, then (float(acc) * xs[m]) * ws[n] in fp32 and the
// output dtype: the bits of torch._int_mm followed by the torch ops' scaling.
// N % 16 == 0, K % 64 == 0; out_dtype 0 float32, 1 bfloat16.
#if !defined(__AVX512VNNI__) || !defined(__AVX512BF16__) || \
    (defined(__AMX_TILE__) && !defined(__AMX_INT8__))
#error "this CPU has no AVX-512 VNNI and BF16 (or the compiler does not target them)"
#endif
#include <cstdint>
#include <cstring>
#include <vector>

#include "../amx_tiles.h"
#include "../packed_call.h"

namespace {

// 16 exact sums of one token -> scaled -> out (fp32 or bf16, nearest even)
inline void store16(__m512i acc, float xs, const float* ws, void* out, int dtype) {
  const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(xs)),
                                 _mm512_loadu_ps(ws));
  if (dtype == 0) {
    _mm512_storeu_ps(out, y);
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(y));
  }
}

template <int M>
void few_tokens(const int8_t* x, const float* xs, const int8_t* codes, const float* ws,
                const int32_t* rowsum, char* out, int dtype, int64_t N, int64_t K,
                int threads) {
  std::vector<uint8_t> xu(M * K);  // x + 128, once per call
  for (int64_t i = 0; i < M * K; ++i) xu[i] = static_cast<uint8_t>(x[i] ^ 0x80);
  const int64_t esize = dtype == 0 ? 4 : 2;
  q_amx::for_strips(N, K, threads, [&](int64_t s) {
    const int8_t* src = codes + s * K * 16;
    __m512i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
    for (int64_t r = 0; r < K / 4; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(src + r * 64 + 4096), _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(src + r * 64);
      for (int m = 0; m < M; ++m) {
        int32_t quad;
        std::memcpy(&quad, xu.data() + m * K + 4 * r, sizeof quad);
        acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(quad), w);
      }
    }
    const __m512i correction = _mm512_slli_epi32(_mm512_loadu_si512(rowsum + s * 16), 7);
    for (int m = 0; m < M; ++m)
      store16(_mm512_sub_epi32(acc[m], correction), xs[m], ws + s * 16,
              out + (m * N + s * 16) * esize, dtype);
  });
}

// strip_of(s, buffer): strip s in the layout above (in place, buffer_bytes 0, or written
// into the thread's buffer of buffer_bytes from K * 16 bytes of codes)
#if defined(__AMX_TILE__)
template <class StripOf>
void gemm(const int8_t* x, const float* xs, StripOf strip_of, int64_t buffer_bytes,
          const float* ws, const int32_t*, char* out, int dtype, int64_t M, int64_t N,
          int64_t K, int threads) {
  const int64_t esize = dtype == 0 ? 4 : 2;
  q_amx::tile_loop(
      reinterpret_cast<const char*>(x), K, M, N / 16, K / 64, buffer_bytes, threads, strip_of,
      Q_AMX_DOTS(_tile_dpbssd),
      [&](const char* sums, int64_t m, int64_t s) {
        store16(_mm512_load_si512(sums), xs[m], ws + s * 16, out + (m * N + s * 16) * esize,
                dtype);
      });
}
#else
template <class StripOf>
void gemm(const int8_t* x, const float* xs, StripOf strip_of, int64_t buffer_bytes,
          const float* ws, const int32_t* rowsum, char* out, int dtype, int64_t M, int64_t N,
          int64_t K, int threads) {
  const int64_t esize = dtype == 0 ? 4 : 2;
  std::vector<uint8_t> xu(M * K);  // x + 128, once per call
  for (int64_t i = 0; i < M * K; ++i) xu[i] = static_cast<uint8_t>(x[i] ^ 0x80);
  // each token's 4 codes + 128 (unsigned) against the strip's signed codes: exact int32
  // sums, 128 * rowsum too many (taken out at the store); no overflow for K < 65793
  q_amx::vector_loop(
      reinterpret_cast<const char*>(xu.data()), K, M, N / 16, K / 4, buffer_bytes, threads,
      K * 16, strip_of,
      [](__m512i acc, __m512i x4, __m512i row) { return _mm512_dpbusd_epi32(acc, x4, row); },
      [&](const char* sums, int64_t m, int64_t s) {
        const __m512i correction = _mm512_slli_epi32(_mm512_loadu_si512(rowsum + s * 16), 7);
        store16(_mm512_sub_epi32(_mm512_load_si512(sums), correction), xs[m], ws + s * 16,
                out + (m * N + s * 16) * esize, dtype);
      });
}
#endif

// strips read where they lie (the layout above)
inline auto in_place(const int8_t* codes, int64_t K) {
  return [codes, K](int64_t s, char*) {
    return reinterpret_cast<const char*>(codes + s * K * 16);
  };
}

}  // namespace

// 0 when this process may use AMX tiles (or runs without them)
extern "C" int q_amx_int8_init() { return q_amx::request_permission(); }

// x [M, K] int8 codes with scales xs [M]; codes in the layout above with scales ws [N] and
// row sums rowsum [N] (int32, sum_k w[n, k]); out [M, N] in out_dtype.
extern "C" int q_int8_amx(int out_dtype, const int8_t* x, const float* xs, const int8_t* codes,
                          const float* ws, const int32_t* rowsum, void* out, int64_t M,
                          int64_t N, int64_t K, int threads) {
  if (N % 16 || K % 64 || M < 1 || (out_dtype != 0 && out_dtype != 1)) return 1;
  char* o = static_cast<char*>(out);
  if (!q_amx::few_tokens(M, [&](auto m) {  // the register path (no AMX state needed)
        few_tokens<decltype(m)::value>(x, xs, codes, ws, rowsum, o, out_dtype, N, K, threads);
      }))
    gemm(x, xs, in_place(codes, K), 0, ws, rowsum, o, out_dtype, M, N, K, threads);
  return 0;
}

// The same product with the weight in weight_only_gemm/amx_gemm.cpp's pair layout ([N / 16]
// [K / 2][16][2]: weight-only int8 codes, per-channel scales ws) for 5+ tokens: each strip
// is regrouped into the quad layout above in the core's cache (two pair rows are one quad
// row: channel c's two pairs side by side, one vpermw per 64 bytes) and multiplied there.
// The weight-only int8 layers' int8 prefill (q.kernels.weight_only_gemm), so that the
// weight is not held twice. N % 16 == 0, K % 64 == 0, M >= 5.
extern "C" int q_int8_amx_pairs(int out_dtype, const int8_t* x, const float* xs,
                                const int8_t* pairs, const float* ws, const int32_t* rowsum,
                                void* out, int64_t M, int64_t N, int64_t K, int threads) {
  if (N % 16 || K % 64 || M < 5 || (out_dtype != 0 && out_dtype != 1)) return 1;
  // result word 2c + h is word c of pair row 2r + h (16-bit words: a channel's code pair)
  alignas(64) int16_t order[32];
  for (int c = 0; c < 16; ++c) order[2 * c] = c, order[2 * c + 1] = 16 + c;
  const __m512i regroup = _mm512_load_si512(order);
  gemm(x, xs,
       [&](int64_t s, char* buffer) {
         const char* src = reinterpret_cast<const char*>(pairs + s * K * 16);
         for (int64_t r = 0; r < K / 4; ++r) {
           if ((r & 7) == 0) _mm_prefetch(src + r * 64 + 1024, _MM_HINT_T0);
           const __m512i rows = _mm512_loadu_si512(src + r * 64);
           _mm512_store_si512(buffer + r * 64, _mm512_permutexvar_epi16(regroup, rows));
         }
         return static_cast<const char*>(buffer);
       },
       K * 16, ws, rowsum, static_cast<char*>(out), out_dtype, M, N, K, threads);
  return 0;
}

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_int8_amx)
