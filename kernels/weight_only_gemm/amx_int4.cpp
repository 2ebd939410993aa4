// Weight-only int4 GEMM (groups of 32-256 along K, a scale and a float zero per group) on
// AMX-BF16 tiles, for any number of tokens: the packed weight is read once per call at its
// own size (half a byte per value, plus the group scales).
//
// Why: torch's _weight_int4pack_mm_for_cpu runs a GEMV per token (400-450 ms for a 1.1B
// model's weights at 32 tokens streaming from memory, 2-3x bf16 GEMM), and dequantizing
// the whole weight for a call writes and reads back a bf16 copy of it
// (tests/bench/bench_decode_gemms_cpu.py).
//
// Layout (made once at load by cpp_impl.to_amx_int4_layout): codes [N / 16][K / 4][32]
// bytes holding q = code + 8 (0..15). Byte i of block t of a 16-channel strip holds channel
// i / 2's q at k = 4t + i % 2 in its low nibble and at k = 4t + 2 + i % 2 in its high one:
// a block's low nibbles widened to 16 bits are the strip's B-operand row for the pair
// (4t, 4t + 1) of tdpbf16ps, its high nibbles the row for (4t + 2, 4t + 3).
// sz [N / 16][K / group][2][16] bf16: per strip and group, the 16 channels' scales, then
// their zeros; w = (q - 8) * s + z (torch's int4pack convention, z = -zero_point * s).
//
// From 9 tokens on, each strip is widened to bf16 weights in the core's cache with the
// roundings of the dequantizing path it replaces (bf16((q - 8) * s), then + z rounded
// again: dequant.cpp's numbers), and multiplied by tdpbf16ps, 32 tokens per pass (on CPUs
// without tiles, vdpbf16ps 8 tokens per pass: amx_tiles.h's bf16_gemm).
// Up to 8 tokens, no tiles and no dequantization: the nibbles widened to int16 meet the
// activations as 16-bit fixed-point integers (amx_tiles.h's to_fixed_point) in vpdpwssd,
// summed exactly per group, and the group adds s * sum((q - 8) x) + z * sum(x) to the result
// (the roundings differ from the tile path's, both within bf16 rounding of the reference).
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

namespace {

inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 values (q in int32 lanes) -> (q - 8) * s, rounded to bf16, + z (as fp32; the caller
// rounds it to bf16 once more). q * s - 8 s in one FMA is exact: q * s and 8 s hold at most
// 12 significant bits, and so does their difference, (q - 8) * s.
inline __m512 dequant16(__m512i q, __m512 s, __m512 minus_8s, __m512 z, bool zero) {
  __m512 w = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, minus_8s);
  if (zero) w = _mm512_add_ps(_mm512_cvtpbh_ps(_mm512_cvtneps_pbh(w)), z);
  return w;
}

// one strip -> K / 2 rows of 32 bf16 weights: the B tiles of tdpbf16ps, 1024 bytes per K step
void widen_strip(const uint8_t* src, const uint16_t* sz, uint16_t* dst, int64_t K,
                 int64_t group, bool zero) {
  // element i of a row is channel i / 2's: the first 16 elements are channels 0-7
  const __m512i first = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  const __m512i low = _mm512_set1_epi32(0xF);
  const int64_t blocks = group / 4;
  for (int64_t g = 0; g < K / group; ++g) {
    const __m512 s = load_bf16x16(sz + g * 32), z = load_bf16x16(sz + g * 32 + 16);
    const __m512 s0 = _mm512_permutexvar_ps(first, s), s1 = _mm512_permutexvar_ps(second, s);
    const __m512 z0 = _mm512_permutexvar_ps(first, z), z1 = _mm512_permutexvar_ps(second, z);
    const __m512 eight = _mm512_set1_ps(-8.0f);
    const __m512 m0 = _mm512_mul_ps(eight, s0), m1 = _mm512_mul_ps(eight, s1);
    for (int64_t t = g * blocks; t < (g + 1) * blocks; ++t) {
      const uint8_t* b = src + t * 32;
      if ((t & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(b + 1024), _MM_HINT_T0);
      const __m128i* bytes = reinterpret_cast<const __m128i*>(b);
      const __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes));
      const __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes + 1));
      const __m512 a0 = dequant16(_mm512_and_si512(v0, low), s0, m0, z0, zero);
      const __m512 a1 = dequant16(_mm512_and_si512(v1, low), s1, m1, z1, zero);
      const __m512 c0 = dequant16(_mm512_srli_epi32(v0, 4), s0, m0, z0, zero);
      const __m512 c1 = dequant16(_mm512_srli_epi32(v1, 4), s1, m1, z1, zero);
      _mm512_store_si512(dst + t * 64, (__m512i)_mm512_cvtne2ps_pbh(a1, a0));
      _mm512_store_si512(dst + t * 64 + 32, (__m512i)_mm512_cvtne2ps_pbh(c1, c0));
    }
  }
}

// Up to 8 tokens on one strip, no tiles and no bf16: a block's 32 bytes widened to 16 bits
// and masked (low nibbles) or shifted (high ones) are the int16 pairs of q for (4t, 4t + 1)
// and (4t + 2, 4t + 3), which meet each token's activation pairs as 16-bit integers
// (amx_tiles.h's to_fixed_point, one unit per group) in vpdpwssd. Per group, the exact
// int32 sum D = sum (q - 8) X = sum q X - 8 sum X becomes fp32 once, and the group adds
// s * unit * D + z * sum(x) to the result. Integer sums have no order, so a token's numbers
// do not depend on the batch. U blocks per iteration, two accumulators each per token.
// Against the fp32-FMA loop this path replaced (nibble OR 0x4300 as bf16 128 + q, widened),
// over a 1.1B step's weights on a 2-core AMD EPYC: the same at 1 token, 1.4x at 4, 1.3-1.8x
// at 5-8 (tests/bench/bench_decode_gemms_cpu.py, docs/benchmarks.md).
constexpr int kFewTokens = 8;  // tokens the register path takes

template <int M>
void few_tokens_strip(const q_amx::FixedPoint& a, const float* xsum, const uint8_t* src,
                      const uint16_t* sz, uint16_t* out, int64_t N, int64_t K, int64_t group,
                      bool zero) {
  constexpr int U = M <= 4 ? 2 : 1;  // 2 * U * M accumulators: 16 at most
  const __m512i low = _mm512_set1_epi16(0xF);
  const int64_t groups = K / group, blocks = group / 4;
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[M][2 * U];
    for (int m = 0; m < M; ++m)
      for (int i = 0; i < 2 * U; ++i) acc[m][i] = _mm512_setzero_si512();
    for (int64_t t = g * blocks; t < (g + 1) * blocks; t += U) {
      for (int h = 0; h < U; h += 2)
        _mm_prefetch(reinterpret_cast<const char*>(src + (t + h) * 32 + 4096), _MM_HINT_T0);
      for (int h = 0; h < U; ++h) {
        const __m512i w = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (t + h) * 32)));
        const __m512i q01 = _mm512_and_si512(w, low);   // k = 4t, 4t + 1
        const __m512i q23 = _mm512_srli_epi16(w, 4);    // k = 4t + 2, 4t + 3
        for (int m = 0; m < M; ++m) {
          const int16_t* xk = a.x.data() + m * K + 4 * (t + h);
          acc[m][2 * h] = _mm512_dpwssd_epi32(acc[m][2 * h], q01, q_amx::pair_at(xk));
          acc[m][2 * h + 1] = _mm512_dpwssd_epi32(acc[m][2 * h + 1], q23,
                                                  q_amx::pair_at(xk + 2));
        }
      }
    }
    const __m512 s = load_bf16x16(sz + g * 32);
    for (int m = 0; m < M; ++m) {
      __m512i d = _mm512_set1_epi32(-8 * a.sum[m * groups + g]);
      for (int i = 0; i < 2 * U; ++i) d = _mm512_add_epi32(d, acc[m][i]);
      const __m512 dx = _mm512_mul_ps(_mm512_cvtepi32_ps(d),
                                      _mm512_set1_ps(a.unit[m * groups + g]));
      total[m] = _mm512_fmadd_ps(s, dx, total[m]);
      if (zero)
        total[m] = _mm512_fmadd_ps(load_bf16x16(sz + g * 32 + 16),
                                   _mm512_set1_ps(xsum[m * groups + g]), total[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N),
                        (__m256i)_mm512_cvtneps_pbh(total[m]));
}

template <int M>
void few_tokens(const uint16_t* x, const uint8_t* codes, const uint16_t* sz, uint16_t* out,
                int64_t N, int64_t K, int64_t group, bool zero, int threads) {
  const int64_t groups = K / group;
  std::vector<float> xsum(M * groups);  // each token's sum over each group, for the zeros
  for (int64_t i = 0; zero && i < M * groups; ++i) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t k = 0; k < group; k += 16)
      sum = _mm512_add_ps(sum, load_bf16x16(x + i * group + k));
    xsum[i] = _mm512_reduce_add_ps(sum);
  }
  const q_amx::FixedPoint a = q_amx::to_fixed_point(x, M, K, group);  // once per call
  q_amx::for_strips(N, K, threads, [&](int64_t s) {
    few_tokens_strip<M>(a, xsum.data(), codes + s * K * 8, sz + s * groups * 32, out + s * 16,
                        N, K, group, zero);
  });
}

#if !defined(__AMX_TILE__)
// ---- int8 activations (the engine's woq_activations="int8"), on CPUs without tiles ----
//
// 9+ tokens as int4 x int8: the activations are quantized per token and group of the
// weight's (amax / 127, round half to even, as q.kernels.act_quant's reference does with
// group_size = group), each strip is widened to bytes q = code + 8 (0..15), four per channel
// and 32-bit lane, and the codes meet them in vpdpbusd (q unsigned, activations signed: 64
// products per instruction, twice vdpbf16ps's). Per group the exact int32 sum starts at -8
// * (the token's code sum over the group), so it ends at D = sum (q - 8) xq, and the token's
// 16 channel sums get s * a * D (a the group's activation scale: per group, as llama.cpp's
// q8 blocks, not per token, which costs one product per group and keeps outliers in their
// group), plus z * sum(x) where the weight has zeros (sum(x) of the bf16 activations, as the
// exact path takes it).
//
// A block's 32 bytes widened to 16-bit words w (vpmovzxbw) give, per 32-bit lane c, channel
// c's bytes b (k = 4t low nibble, 4t + 2 high) and b' (4t + 1, 4t + 3); (w | w << 4) &
// 0x0F0F puts the nibbles in the lane as k = 4t, 4t + 2, 4t + 1, 4t + 3, and the tokens'
// codes are stored in that order.
constexpr int kInt8Tokens = 8;  // tokens per pass over a widened strip

void widen_strip_u8(const uint8_t* src, uint8_t* dst, int64_t K) {
  const __m512i nibbles = _mm512_set1_epi16(0x0F0F);
  for (int64_t t = 0; t < K / 4; ++t) {
    if ((t & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + t * 32 + 1024),
                                   _MM_HINT_T0);
    const __m512i w = _mm512_cvtepu8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + t * 32)));
    // (w | w << 4) & 0x0F0F: 0xA8 = (A | B) & C (A = 0xF0, B = 0xCC, C = 0xAA)
    const __m512i q = _mm512_ternarylogic_epi32(w, _mm512_slli_epi16(w, 4), nibbles, 0xA8);
    _mm512_store_si512(dst + t * 64, q);
  }
}

// The activations of M tokens, quantized per token and group (reordered per quad as above)
struct GroupCodes {
  std::vector<int8_t> x;       // [M][K]
  std::vector<float> scale;    // [M][groups]: a = max(amax, 1e-10) / 127
  std::vector<int32_t> sum;    // [M][groups]: the group's sum of codes
  std::vector<float> xsum;     // [M][groups]: the group's sum of x (zeros only)
};

GroupCodes quantize_groups(const uint16_t* x, int64_t M, int64_t K, int64_t group,
                           bool zero, int threads) {
  const int64_t groups = K / group;
  GroupCodes a{std::vector<int8_t>(M * K), std::vector<float>(M * groups),
               std::vector<int32_t>(M * groups), std::vector<float>(zero ? M * groups : 0)};
  const __m512 lim = _mm512_set1_ps(127.f);
  // within each 4 bytes: k = 4t, 4t + 2, 4t + 1, 4t + 3
  const __m128i order = _mm_setr_epi8(0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15);
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* xg = x + m * K + g * group;
      __m512 top = _mm512_setzero_ps(), total = _mm512_setzero_ps();
      for (int64_t k = 0; k < group; k += 16) {
        const __m512 v = load_bf16x16(xg + k);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        total = _mm512_add_ps(total, v);
      }
      const float scale = std::max(_mm512_reduce_max_ps(top), 1e-10f) / 127.f;
      const __m512 sv = _mm512_set1_ps(scale);
      __m512i sums = _mm512_setzero_si512();
      int8_t* out = a.x.data() + m * K + g * group;
      for (int64_t k = 0; k < group; k += 16) {  // IEEE division, nearest even, clamped
        const __m512 v = _mm512_div_ps(load_bf16x16(xg + k), sv);
        const __m512i q = _mm512_cvtps_epi32(
            _mm512_max_ps(_mm512_min_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT |
                                                                    _MM_FROUND_NO_EXC),
                                        lim),
                          _mm512_sub_ps(_mm512_setzero_ps(), lim)));
        sums = _mm512_add_epi32(sums, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                         _mm_shuffle_epi8(_mm512_cvtepi32_epi8(q), order));
      }
      a.scale[m * groups + g] = scale;
      a.sum[m * groups + g] = _mm512_reduce_add_epi32(sums);
      if (zero) a.xsum[m * groups + g] = _mm512_reduce_add_ps(total);
    }
  }
  return a;
}

// R tokens' group codes against one widened strip: out rows get sum_g s_g a_g D_g (+ z_g
// sum_g(x)), rounded to bf16
template <int R>
void int8_pass(const GroupCodes& a, int64_t m0, const uint8_t* strip, const uint16_t* sz,
               uint16_t* out, int64_t N, int64_t K, int64_t group, bool zero) {
  const int64_t groups = K / group, rows = group / 4;
  const int8_t* xq = a.x.data() + m0 * K;
  __m512 total[R];
  for (int m = 0; m < R; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R];
    for (int m = 0; m < R; ++m) acc[m] = _mm512_set1_epi32(-8 * a.sum[(m0 + m) * groups + g]);
    for (int64_t r = g * rows; r < (g + 1) * rows; ++r) {
      const __m512i w = _mm512_load_si512(strip + r * 64);
      for (int m = 0; m < R; ++m) {
        int32_t quad;
        std::memcpy(&quad, xq + m * K + 4 * r, sizeof quad);
        acc[m] = _mm512_dpbusd_epi32(acc[m], w, _mm512_set1_epi32(quad));
      }
    }
    const __m512 s = load_bf16x16(sz + g * 32);
    for (int m = 0; m < R; ++m)
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]),
                                 _mm512_mul_ps(s, _mm512_set1_ps(a.scale[(m0 + m) * groups + g])),
                                 total[m]);
    if (zero) {
      const __m512 z = load_bf16x16(sz + g * 32 + 16);
      for (int m = 0; m < R; ++m)
        total[m] = _mm512_fmadd_ps(z, _mm512_set1_ps(a.xsum[(m0 + m) * groups + g]), total[m]);
    }
  }
  for (int m = 0; m < R; ++m)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N),
                        (__m256i)_mm512_cvtneps_pbh(total[m]));
}
#endif

}  // namespace

// 0 when this process may use AMX tiles (or runs without them)
extern "C" int q_amx_int4_init() { return q_amx::request_permission(); }

// x [M, K] bf16; codes, sz, zero as for q_wo_int4_amx; out [M, N] bf16. 2 (and nothing
// done) on CPUs with AMX tiles, where this path is not built; 1 for shapes it does not take
// (M < 9 included).
extern "C" int q_wo_int4_int8(const uint16_t* x, const uint8_t* codes, const uint16_t* sz,
                              uint16_t* out, int64_t M, int64_t N, int64_t K, int64_t group,
                              int zero, int threads) {
#if defined(__AMX_TILE__)
  return 2;
#else
  if (N % 16 || group % 32 || group < 32 || K % group || M < 9) return 1;
  const int64_t groups = K / group, strips = N / 16;
  const GroupCodes a = quantize_groups(x, M, K, group, zero != 0, threads);  // once per call
  const int nt = strips > 1 ? threads : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<uint8_t> buffer(K * 16 + 64);
    uint8_t* strip = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    const int64_t chunk = q_amx::vector_chunk(K);
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = std::min(M, c0 + chunk);
#pragma omp for schedule(static)
      for (int64_t s = 0; s < strips; ++s) {
        widen_strip_u8(codes + s * K * 8, strip, K);
        for (int64_t m0 = c0; m0 < c1; m0 += kInt8Tokens) {
          const int64_t n = std::min<int64_t>(kInt8Tokens, c1 - m0);
          q_amx::for_count<kInt8Tokens>(n, [&](auto r) {
            int8_pass<decltype(r)::value>(a, m0, strip, sz + s * groups * 32,
                                          out + m0 * N + s * 16, N, K, group, zero != 0);
          });
        }
      }
    }
  }
  return 0;
#endif
}
// x [M, K] bf16; codes, sz in the layout above (zero: whether any z is nonzero); out [M, N]
// bf16.
extern "C" int q_wo_int4_amx(const uint16_t* x, const uint8_t* codes, const uint16_t* sz,
                             uint16_t* out, int64_t M, int64_t N, int64_t K, int64_t group,
                             int zero, int threads) {
  if (N % 16 || group % 32 || group < 32 || K % group || M < 1) return 1;
  if (q_amx::few_tokens<kFewTokens>(M, [&](auto m) {  // the register path (no AMX state needed)
        few_tokens<decltype(m)::value>(x, codes, sz, out, N, K, group, zero != 0,
                                        threads);
      }))
    return 0;
  const int64_t groups = K / group;
  q_amx::bf16_gemm(
      x, M, K, N / 16, K * 32, threads,
      [&](int64_t s, char* buffer) {
        widen_strip(codes + s * K * 8, sz + s * groups * 32, reinterpret_cast<uint16_t*>(buffer),
                    K, group, zero != 0);
        return static_cast<const char*>(buffer);
      },
      [&](const char* sums, int64_t m, int64_t s) {
        const __m512 y = _mm512_load_ps(reinterpret_cast<const float*>(sums));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + s * 16),
                            (__m256i)_mm512_cvtneps_pbh(y));
      });
  return 0;
}
