// Weight-only int4 GEMM (groups of 32-256 along K, a scale and a float zero per group) on
// AMX-BF16 tiles, for any number of tokens: the packed weight is read once per call at its
// own size (half a byte per value, plus the group scales).
//
// Why: torch's _weight_int4pack_mm_for_cpu runs a GEMV per token (400-450 ms for a 1.1B
// model's weights at 32 tokens streaming from memory, 2-3x bf16 GEMM), and dequantizing
// the whole weight for a call writes and reads back a bf16 copy of it
// (tests/bench/bench_decode_gemms_cpu.py).
//
// Layout (made once at load by cpp_impl.to_amx_int4_layout): codes [N / 16][K / 8][64]
// bytes holding q = code + 8 (0..15). In block t of a 16-channel strip, byte 4c + j holds
// channel c's q at k = 8t + j in its low nibble and at k = 8t + 4 + j in its high one: a
// block's low (high) nibbles are one 32-bit lane of four consecutive k per channel, what
// vpdpbusd multiplies, and their 16-bit halves are tdpbf16ps's B-operand rows for the
// pairs (8t, 8t + 1) and (8t + 2, 8t + 3) ((8t + 4, 8t + 5) and (8t + 6, 8t + 7)).
// sz [N / 16][K / group][2][16] bf16: per strip and group, the 16 channels' scales, then
// their zeros; w = (q - 8) * s + z (torch's int4pack convention, z = -zero_point * s).
// Without zeros (`zero` false) [N / 16][K / group][1][16]: the scales alone.
//
// From 17 tokens on, each strip is widened to bf16 weights in the core's cache with the
// roundings of the dequantizing path it replaces (bf16((q - 8) * s), then + z rounded
// again: dequant.cpp's numbers), and multiplied by tdpbf16ps, 32 tokens per pass (on CPUs
// without tiles, vdpbf16ps 8 tokens per pass: amx_tiles.h's bf16_gemm).
// Up to kRegisterTokens (16), no tiles and no dequantization: the nibbles meet the
// activations as 16-bit fixed-point integers (amx_tiles.h's to_fixed_point), split in
// bytes, in vpdpbusd, 8 tokens per pass over each strip, summed exactly per group, and the
// group adds s * sum((q - 8) x) + z * sum(x) to the result (the roundings differ from the
// tile path's, both within bf16 rounding of the reference).
// N % 16 == 0, group % 32 == 0, K % group == 0.
#if !defined(__AVX512BF16__) || !defined(__AVX512VNNI__) || \
    (defined(__AMX_TILE__) && !defined(__AMX_BF16__))
#error "this CPU has no AVX-512 BF16 and VNNI (or the compiler does not target them)"
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../amx_tiles.h"
#include "../packed_call.h"

namespace {

inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// bf16 values of sz per strip and group: 16 scales, and 16 zeros where there are any
inline int64_t sz_stride(bool zero) { return zero ? 32 : 16; }

// 16 values (q in int32 lanes) -> (q - 8) * s, rounded to bf16, + z (as fp32; the caller
// rounds it to bf16 once more). q * s - 8 s in one FMA is exact: q * s and 8 s hold at most
// 12 significant bits, and so does their difference, (q - 8) * s.
inline __m512 dequant16(__m512i q, __m512 s, __m512 minus_8s, __m512 z, bool zero) {
  __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, minus_8s);
  if (zero) w = _mm512_add_ps(_mm512_cvtpbh_ps(_mm512_cvtneps_pbh(w)), z);
  return w;
}

// nibbles (0..15) of a block's 64 bytes: the low ones, then the high ones
inline __m512i low_nibbles(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi8(0xF)); }
inline __m512i high_nibbles(__m512i v) {
  return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0xF));
}

// one strip -> K / 2 rows of 32 bf16 weights: the B tiles of tdpbf16ps, 1024 bytes per K step
void widen_strip(const uint8_t* src, const uint16_t* sz, uint16_t* dst, int64_t K,
                 int64_t group, bool zero) {
  // element i of a row is channel i / 2's: the first 16 elements are channels 0-7
  const __m512i first = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const int64_t blocks = group / 8;
  for (int64_t g = 0; g < K / group; ++g) {
    const __m512 s = load_bf16x16(sz + g * sz_stride(zero));
    const __m512 z = zero ? load_bf16x16(sz + g * 32 + 16) : _mm512_setzero_ps();
    const __m512 s0 = _mm512_permutexvar_ps(first, s), s1 = _mm512_permutexvar_ps(second, s);
    const __m512 z0 = _mm512_permutexvar_ps(first, z), z1 = _mm512_permutexvar_ps(second, z);
    const __m512 eight = _mm512_set1_ps(-8.0f);
    const __m512 m0 = _mm512_mul_ps(eight, s0), m1 = _mm512_mul_ps(eight, s1);
    for (int64_t t = g * blocks; t < (g + 1) * blocks; ++t) {
      const uint8_t* b = src + t * 64;
      _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(b);
      const __m512i quads[2] = {low_nibbles(v), high_nibbles(v)};
      for (int h = 0; h < 4; ++h) {  // rows 4t + h: k = 8t + 2h, 8t + 2h + 1
        // each channel's pair: the low or high 16 bits of its lane, 16 channels = 32 bytes
        const __m512i lanes = quads[h / 2];
        const __m256i pair = _mm512_cvtepi32_epi16(h % 2 ? _mm512_srli_epi32(lanes, 16) : lanes);
        const __m512 a0 = dequant16(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(pair)), s0, m0,
                                    z0, zero);
        const __m512 a1 = dequant16(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(pair, 1)),
                                    s1, m1, z1, zero);
        _mm512_store_si512(dst + (4 * t + h) * 32, (__m512i)_mm512_cvtne2ps_pbh(a1, a0));
      }
    }
  }
}

// Up to 8 tokens of one strip, no tiles and no bf16. A token's 16-bit fixed-point
// activations X (amx_tiles.h's to_fixed_point, one unit per group) split into bytes, X =
// 256 hi + lo (hi signed, lo unsigned), and a block's low (high) nibbles q, unsigned and
// below 128, are valid as either operand of vpdpbusd: sum q hi with q as the unsigned one,
// sum q lo with lo as the unsigned one, 64 products per instruction. Per group the exact
// int32 sum D = 256 sum q hi + sum q lo - 8 sum X = sum (q - 8) X becomes fp32 once, and the
// group adds s * unit * D + z * sum(x) to the result. Integer sums have no order, so a
// token's numbers do not depend on the batch. The same D as the vpdpwssd loop this replaced
// (the nibbles widened to int16: 10 vector instructions per 64 bytes of codes against 6),
// so the same bits.
constexpr int kFewTokens = 8;  // tokens per pass of the register path
// Tokens the register path takes (q_wo_int4_register_tokens), as amx_gemm.cpp's: over a
// 1.1B step's weights on a 2-core AMD EPYC, wint4 g64 over bf16, this path against the
// widened one: 0.71-0.74 against 1.15-1.26 at 9 tokens, 0.96-0.97 against 1.12-1.23 at 16,
// even at 32 (1.09-1.12 against 1.08-1.13), behind from 48; over SmolLM2's 0.80-0.94
// against 1.07-1.09 at 9, 1.01-1.16 against 1.02-1.05 at 16, 1.15-1.40 against 1.01-1.02
// at 32 (tests/bench/bench_decode_gemms_cpu.py, alternated builds)
constexpr int64_t kRegisterTokens = 16;

// X split in bytes: hi = X >> 8 (-128..127), lo = X & 255
struct ByteSplit {
  std::vector<int8_t> hi;
  std::vector<uint8_t> lo;
};

inline ByteSplit split_bytes(const q_amx::FixedPoint& a) {
  ByteSplit b{std::vector<int8_t>(a.x.size()), std::vector<uint8_t>(a.x.size())};
  for (size_t i = 0; i < a.x.size(); ++i) {
    b.hi[i] = static_cast<int8_t>(a.x[i] >> 8);
    b.lo[i] = static_cast<uint8_t>(a.x[i] & 0xFF);
  }
  return b;
}

inline __m512i quad_at(const void* p) {  // 4 bytes, broadcast to every lane
  int32_t quad;
  std::memcpy(&quad, p, sizeof quad);
  return _mm512_set1_epi32(quad);
}

template <int M>
void few_tokens_strip(const q_amx::FixedPoint& a, const ByteSplit& x, const float* xsum,
                      int64_t m0, const uint8_t* src, const uint16_t* sz, uint16_t* out,
                      int64_t N, int64_t K, int64_t group, bool zero) {
  // per token, sums of q hi and of q lo, for the low and the high nibbles apart when one
  // token leaves the instructions' latency exposed: 4 * M or 2 * M accumulators
  constexpr int A = M <= 2 ? 4 : 2;
  const int64_t groups = K / group, blocks = group / 8;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < A; ++i) acc[m][i] = _mm512_setzero_si512();
    for (int64_t t = g * blocks; t < (g + 1) * blocks; ++t) {
      _mm_prefetch(reinterpret_cast<const char*>(src + t * 64 + 4096), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(src + t * 64);
      const __m512i q[2] = {low_nibbles(v), high_nibbles(v)};  // k = 8t + 0..3, 8t + 4..7
      for (int m = 0; m < M; ++m) {
        const int64_t k = (m0 + m) * K + 8 * t;
        for (int h = 0; h < 2; ++h) {
          __m512i& hi = acc[m][A == 4 ? 2 * h : 0];
          __m512i& lo = acc[m][A == 4 ? 2 * h + 1 : 1];
          hi = _mm512_dpbusd_epi32(hi, q[h], quad_at(x.hi.data() + k + 4 * h));
          lo = _mm512_dpbusd_epi32(lo, quad_at(x.lo.data() + k + 4 * h), q[h]);
        }
      }
    }
    const __m512 s = load_bf16x16(sz + g * sz_stride(zero));
    for (int m = 0; m < M; ++m) {
      __m512i hi = acc[m][0], lo = acc[m][1];
      if (A == 4) {
        hi = _mm512_add_epi32(hi, acc[m][2]);
        lo = _mm512_add_epi32(lo, acc[m][3]);
      }
      const __m512i d = _mm512_add_epi32(
          _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo),
          _mm512_set1_epi32(-8 * a.sum[(m0 + m) * groups + g]));
      const __m512 dx = _mm512_mul_ps(_mm512_cvtepi32_ps(d),
                                      _mm512_set1_ps(a.unit[(m0 + m) * groups + g]));
      total[m] = _mm512_fmadd_ps(s, dx, total[m]);
      if (zero)
        total[m] = _mm512_fmadd_ps(load_bf16x16(sz + g * 32 + 16),
                                   _mm512_set1_ps(xsum[(m0 + m) * groups + g]), total[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N),
                        (__m256i)_mm512_cvtneps_pbh(total[m]));
}

// Up to kRegisterTokens tokens: passes of up to kFewTokens over each strip in turn
void register_path(const uint16_t* x, const uint8_t* codes, const uint16_t* sz, uint16_t* out,
                   int64_t M, int64_t N, int64_t K, int64_t group, bool zero, int threads) {
  const int64_t groups = K / group;
  std::vector<float> xsum(M * groups);  // each token's sum over each group, for the zeros
  for (int64_t i = 0; zero && i < M * groups; ++i) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < group; k += 16)
      sum = _mm512_add_ps(sum, load_bf16x16(x + i * group + k));
    xsum[i] = _mm512_reduce_add_ps(sum);
  }
  const q_amx::FixedPoint a = q_amx::to_fixed_point(x, M, K, group);  // once per call
  const ByteSplit bytes = split_bytes(a);
  q_amx::for_strip_passes<kFewTokens>(N, K, M, threads, [&](int64_t s, int64_t m0, auto r) {
    few_tokens_strip<decltype(r)::value>(a, bytes, xsum.data(), m0, codes + s * K * 8,
                                         sz + s * groups * sz_stride(zero),
                                         out + m0 * N + s * 16, N, K, group, zero);
  });
}

}  // namespace

// 0 when this process may use AMX tiles (or runs without them)
extern "C" int q_amx_int4_init() { return q_amx::request_permission(); }

// kRegisterTokens, for cpp_impl.register_tokens (the tests' batch-invariance checks)
extern "C" int q_wo_int4_register_tokens() { return static_cast<int>(kRegisterTokens); }

// x [M, K] bf16; codes, sz in the layout above (zero: whether any z is nonzero); out [M, N]
// bf16.
extern "C" int q_wo_int4_amx(const uint16_t* x, const uint8_t* codes, const uint16_t* sz,
                             uint16_t* out, int64_t M, int64_t N, int64_t K, int64_t group,
                             int zero, int threads) {
  if (N % 16 || group % 32 || group < 32 || K % group || M < 1) return 1;
  if (M <= kRegisterTokens) {  // no AMX state needed
    register_path(x, codes, sz, out, M, N, K, group, zero != 0, threads);
    return 0;
  }
  const int64_t groups = K / group;
  q_amx::bf16_gemm(
      x, M, K, N / 16, K * 32, threads, K * 8,
      [&](int64_t s, char* buffer) {
        widen_strip(codes + s * K * 8, sz + s * groups * sz_stride(zero),
                    reinterpret_cast<uint16_t*>(buffer), K, group, zero != 0);
        return static_cast<const char*>(buffer);
      },
      [&](const char* sums, int64_t m, int64_t s) {
        const __m512 y = _mm512_load_ps(reinterpret_cast<const float*>(sums));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + s * 16),
                            (__m256i)_mm512_cvtneps_pbh(y));
      });
  return 0;
}

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_wo_int4_amx)
