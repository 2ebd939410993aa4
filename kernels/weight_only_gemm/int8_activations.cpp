// Weight-only layers with int8 activations (the engine's woq_activations="int8"), on CPUs
// without AMX tiles: a prompt's weight-only GEMM is bound by bf16 arithmetic there, and
// vpdpbusd multiplies twice vdpbf16ps's products per instruction.
//
// Activations: quantized per token and block of kActGroup (32) values, a = max(amax,
// 1e-10) / 127, round half to even (q.kernels.act_quant's reference with group_size 32; the
// block size of llama.cpp's q8_0). One scale per 32 values keeps an outlier's damage in its
// block: on SmolLM2 with int8 weights, fake-quantized per-token scales cost +2.2%
// perplexity over exact activations, blocks of 32 +0.3% (tests/bench/woq_activation_blocks.py;
// docs/engine.md has the engine's numbers).
//
// Weights, read in the layout the exact path keeps (the weight is held once):
//   int4 (amx_int4.cpp's): a strip's 64-byte blocks of nibbles q = code + 8 are widened to
//     bytes in the core's cache, K / 8 blocks -> K / 4 rows of 64 bytes (4 k of 16 channels);
//     a group's scales s and zeros z (bf16, per strip and weight group) apply per group.
//   int8 (amx_gemm.cpp's pair layout, per-channel fp32 scales): a strip's pair rows are
//     regrouped into those quad rows (one vpermw per 64 bytes) as bytes q = code + 128.
// Either way q is unsigned and the codes signed, vpdpbusd's operands. Per block of 32 k the
// exact int32 sum starts at -off * (the token's code sum over the block), off = 8 or 128,
// so it ends at D = sum (q - off) xq, and the block adds float(D) * (s * a) to the sums, s the
// weight group's scale (+ z * sum(x) per group where the weight has zeros: the bf16
// activations' sum, as the exact path takes it). The output is rounded to bf16 once.
//
// 4 tokens per pass over two prepared strips; tokens in L2-sized chunks (amx_tiles.h).
#if !defined(__AVX512BF16__) || !defined(__AVX512VNNI__)
#error "this CPU has no AVX-512 BF16 and VNNI (or the compiler does not target them)"
#endif
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../amx_tiles.h"

namespace {

constexpr int64_t kActGroup = 32;  // activation values per scale
// tokens per pass over two strips (which share each token's broadcast codes): 4, 5 and 6
// ran alike on the AMD EPYC (tests/bench/bench_decode_gemms_cpu.py --tokens 256), 4 leaves
// registers to spare; a strip a pass ran 1.2-1.3x slower
constexpr int kTokens = 4;

inline __m512 load_bf16x16(const uint16_t* p) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The activations of M tokens, quantized per token and block of `block` values
struct BlockCodes {
  std::vector<int8_t> x;       // [M][K]
  std::vector<float> scale;    // [M][blocks]
  std::vector<int32_t> sum;    // [M][blocks]: the block's sum of codes
  std::vector<float> xsum;     // [M][blocks]: the block's sum of x (zeros only)
};

BlockCodes quantize_blocks(const uint16_t* x, int64_t M, int64_t K, int64_t block, bool xsum,
                           int threads) {
  const int64_t blocks = K / block;
  BlockCodes a{std::vector<int8_t>(M * K), std::vector<float>(M * blocks),
               std::vector<int32_t>(M * blocks), std::vector<float>(xsum ? M * blocks : 0)};
  const __m512 lim = _mm512_set1_ps(127.f);
#pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const uint16_t* xb = x + m * K + b * block;
      __m512 top = _mm512_setzero_ps(), total = _mm512_setzero_ps();
      for (int64_t k = 0; k < block; k += 16) {
        const __m512 v = load_bf16x16(xb + k);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        if (xsum) total = _mm512_add_ps(total, v);  // only int4 zeros use it
      }
      const float scale = std::max(_mm512_reduce_max_ps(top), 1e-10f) / 127.f;
      const __m512 sv = _mm512_set1_ps(scale);
      __m512i sums = _mm512_setzero_si512();
      int8_t* out = a.x.data() + m * K + b * block;
      for (int64_t k = 0; k < block; k += 16) {  // IEEE division, nearest even, clamped
        const __m512 v = _mm512_div_ps(load_bf16x16(xb + k), sv);
        const __m512i q = _mm512_cvtps_epi32(
            _mm512_max_ps(_mm512_min_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT |
                                                                    _MM_FROUND_NO_EXC),
                                        lim),
                          _mm512_sub_ps(_mm512_setzero_ps(), lim)));
        sums = _mm512_add_epi32(sums, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(q));
      }
      a.scale[m * blocks + b] = scale;
      a.sum[m * blocks + b] = _mm512_reduce_add_epi32(sums);
      if (xsum) a.xsum[m * blocks + b] = _mm512_reduce_add_ps(total);
    }
  }
  return a;
}

// int4 strip (K / 8 blocks of 64 bytes) -> K / 4 quad rows of bytes q (0..15): a block's
// low nibbles are the row for k = 8t..8t + 3, its high ones the row for 8t + 4..8t + 7
void widen_int4_strip(const uint8_t* src, uint8_t* dst, int64_t K) {
  const __m512i low = _mm512_set1_epi8(0xF);
  for (int64_t t = 0; t < K / 8; ++t) {
    _mm_prefetch(reinterpret_cast<const char*>(src + t * 64 + 1024), _MM_HINT_T0);
    const __m512i v = _mm512_loadu_si512(src + t * 64);
    _mm512_store_si512(dst + t * 128, _mm512_and_si512(v, low));
    _mm512_store_si512(dst + t * 128 + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

// int8 strip in the pair layout (K / 2 rows of 16 channels x 2 codes) -> K / 4 quad rows of
// bytes q = code + 128: word 2c + h of quad row r is word c of pair row 2r + h
void regroup_int8_strip(const int8_t* src, uint8_t* dst, int64_t K) {
  alignas(64) int16_t order[32];
  for (int c = 0; c < 16; ++c) order[2 * c] = c, order[2 * c + 1] = 16 + c;
  const __m512i regroup = _mm512_load_si512(order);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < K / 4; ++r) {
    if ((r & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(src + r * 64 + 1024),
                                   _MM_HINT_T0);
    const __m512i rows = _mm512_loadu_si512(src + r * 64);
    _mm512_store_si512(dst + r * 64,
                       _mm512_xor_si512(_mm512_permutexvar_epi16(regroup, rows), flip));
  }
}

// The weight side of a pass: its offset, groups and each group's 16 scales (and zeros)
template <bool Zero>
struct Int4Weight {
  static constexpr int32_t kOffset = 8;
  static constexpr bool kPerChannel = false, kZero = Zero;
  const uint16_t* sz;  // this strip's [groups][1 or 2][16] bf16
  int64_t group;
  __m512 scale(int64_t g) const { return load_bf16x16(sz + g * (Zero ? 32 : 16)); }
  __m512 zeros(int64_t g) const { return load_bf16x16(sz + g * 32 + 16); }
};
struct Int8Weight {
  static constexpr int32_t kOffset = 128;
  static constexpr bool kPerChannel = true, kZero = false;
  const float* ws;  // this strip's 16 per-channel scales
  int64_t group;    // K: one group
  __m512 scale(int64_t) const { return _mm512_loadu_ps(ws); }
};

// R tokens' block codes against S prepared strips (K / 4 quad rows of unsigned q each): out
// rows get sum_g sum_{b in g} (s_g a_b) D_b (+ z_g sum_g(x)), rounded to bf16. Two strips a
// pass share each token's broadcast codes; the weight scale is folded into the block's
// (s_g * a_b, one product) so that no per-group partial sums take registers.
template <int R, int S, class Weight>
inline __attribute__((always_inline)) void pass(const BlockCodes& a, int64_t m0,
                                                const uint8_t* const* strip, const Weight* w,
                                                uint16_t* out, int64_t N, int64_t K) {
  constexpr int kRows = kActGroup / 4;  // quad rows per block: a fixed count, unrolled
  const int64_t blocks = K / kActGroup, per_group = w[0].group / kActGroup;
  const int8_t* __restrict xq = a.x.data() + m0 * K;
  const float* __restrict ascale = a.scale.data() + m0 * blocks;
  const int32_t* __restrict asum = a.sum.data() + m0 * blocks;
  __m512 total[R][S];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < S; ++j) total[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0, b = 0; g < K / w[0].group; ++g) {
    __m512 s[S];  // per-channel weights: their scale once at the end
    for (int j = 0; j < S; ++j) s[j] = Weight::kPerChannel ? _mm512_setzero_ps() : w[j].scale(g);
    for (int64_t end = b + per_group; b < end; ++b) {
      __m512i acc[R][S];
      for (int m = 0; m < R; ++m) {
        const __m512i start = _mm512_set1_epi32(-Weight::kOffset * asum[m * blocks + b]);
        for (int j = 0; j < S; ++j) acc[m][j] = start;
      }
      const int64_t r0 = b * kRows;
      for (int i = 0; i < kRows; ++i) {
        __m512i q[S];
        for (int j = 0; j < S; ++j) q[j] = _mm512_load_si512(strip[j] + (r0 + i) * 64);
        for (int m = 0; m < R; ++m) {
          int32_t quad;
          std::memcpy(&quad, xq + m * K + 4 * (r0 + i), sizeof quad);
          const __m512i xv = _mm512_set1_epi32(quad);
          for (int j = 0; j < S; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], q[j], xv);
        }
      }
      for (int m = 0; m < R; ++m) {
        const __m512 ab = _mm512_set1_ps(ascale[m * blocks + b]);
        for (int j = 0; j < S; ++j)
          total[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][j]),
                                        Weight::kPerChannel ? ab : _mm512_mul_ps(s[j], ab),
                                        total[m][j]);
      }
    }
    if constexpr (Weight::kZero) {
      for (int m = 0; m < R; ++m) {
        float xs = 0.f;  // the group's sum of x, from its blocks' sums in order
        for (int64_t i = b - per_group; i < b; ++i) xs += a.xsum[(m0 + m) * blocks + i];
        for (int j = 0; j < S; ++j)
          total[m][j] = _mm512_fmadd_ps(w[j].zeros(g), _mm512_set1_ps(xs), total[m][j]);
      }
    }
  }
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < S; ++j) {
      const __m512 y = Weight::kPerChannel ? _mm512_mul_ps(total[m][j], w[j].scale(0))
                                           : total[m][j];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + j * 16),
                          (__m256i)_mm512_cvtneps_pbh(y));
    }
}

// every pair of strips prepared once per chunk of tokens (prepare(s, buffer)) and passed
// over them (an odd last strip alone)
template <class Prepare, class WeightOf>
void gemm(const BlockCodes& a, int64_t M, int64_t N, int64_t K, int64_t weight_bytes,
          int threads, Prepare prepare, WeightOf weight_of, uint16_t* out) {
  const int64_t strips = N / 16, pairs = (strips + 1) / 2;
  const int nt = pairs > 1 ? threads : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<uint8_t> buffer(2 * K * 16 + 64);
    uint8_t* own = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    const uint8_t* strip[2] = {own, own + K * 16};
    const int64_t chunk = q_amx::vector_chunk(K, weight_bytes);
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = std::min(M, c0 + chunk);
#pragma omp for schedule(static)
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t s0 = 2 * p;
        const bool two = s0 + 1 < strips;
        prepare(s0, own);
        if (two) prepare(s0 + 1, own + K * 16);
        const decltype(weight_of(s0)) w[2] = {weight_of(s0), weight_of(two ? s0 + 1 : s0)};
        for (int64_t m0 = c0; m0 < c1; m0 += kTokens) {
          q_amx::for_count<kTokens>(std::min<int64_t>(kTokens, c1 - m0), [&](auto r) {
            constexpr int R = decltype(r)::value;
            uint16_t* o = out + m0 * N + s0 * 16;
            if (two)
              pass<R, 2>(a, m0, strip, w, o, N, K);
            else
              pass<R, 1>(a, m0, strip, w, o, N, K);
          });
        }
      }
    }
  }
}

}  // namespace

// x [M, K] bf16; codes, sz, zero as for amx_int4.cpp's q_wo_int4_amx (weight groups of
// `group`); out [M, N] bf16. 2 (nothing done) on CPUs with AMX tiles, whose int4 kernel
// keeps another layout; 1 for shapes it does not take.
extern "C" int q_wo_int4_int8(const uint16_t* x, const uint8_t* codes, const uint16_t* sz,
                              uint16_t* out, int64_t M, int64_t N, int64_t K, int64_t group,
                              int zero, int threads) {
#if defined(__AMX_TILE__)
  return 2;
#else
  if (N % 16 || group % kActGroup || K % group || M < 1) return 1;
  const BlockCodes a = quantize_blocks(x, M, K, kActGroup, zero != 0, threads);
  const int64_t groups = K / group, sz_stride = zero ? 32 : 16;
  const auto widen = [&](int64_t s, uint8_t* strip) {
    widen_int4_strip(codes + s * K * 8, strip, K);
  };
  if (zero)
    gemm(a, M, N, K, N * K / 2, threads, widen,
         [&](int64_t s) { return Int4Weight<true>{sz + s * groups * sz_stride, group}; }, out);
  else
    gemm(a, M, N, K, N * K / 2, threads, widen,
         [&](int64_t s) { return Int4Weight<false>{sz + s * groups * sz_stride, group}; }, out);
  return 0;
#endif
}

// x [M, K] bf16; pairs [N / 16][K / 2][16][2] int8 (amx_gemm.cpp's layout), ws [N] fp32;
// out [M, N] bf16. 2 (nothing done) on CPUs with AMX tiles, where int8 weights take
// int8 activations per token on AMX-INT8 (scaled_gemm's q_int8_amx_pairs); 1 for shapes it
// does not take.
extern "C" int q_wo_int8_int8(const uint16_t* x, const int8_t* pairs, const float* ws,
                              uint16_t* out, int64_t M, int64_t N, int64_t K, int threads) {
#if defined(__AMX_TILE__)
  return 2;
#else
  if (N % 16 || K % kActGroup || M < 1) return 1;
  const BlockCodes a = quantize_blocks(x, M, K, kActGroup, false, threads);
  gemm(a, M, N, K, N * K, threads,
       [&](int64_t s, uint8_t* strip) { regroup_int8_strip(pairs + s * K * 16, strip, K); },
       [&](int64_t s) { return Int8Weight{ws + s * 16, K}; }, out);
  return 0;
#endif
}

// The activation codes and scales of q_wo_int4_int8 and q_wo_int8_int8 in blocks of
// `block` (they take 32), for tests to compare with q.kernels.act_quant's reference bit for
// bit: x [M, K] bf16; codes [M, K] int8, scales [M, K / block] fp32. 1 for shapes it does
// not take.
extern "C" int q_int8_block_codes(const uint16_t* x, int8_t* codes, float* scales, int64_t M,
                                  int64_t K, int64_t block, int threads) {
  if (block % 16 || block < 16 || K % block || M < 1) return 1;
  const BlockCodes a = quantize_blocks(x, M, K, block, false, threads);
  std::copy(a.x.begin(), a.x.end(), codes);
  std::copy(a.scale.begin(), a.scale.end(), scales);
  return 0;
}

// kActGroup, for the Python side's docs and tests
extern "C" int q_int8_activation_block() { return static_cast<int>(kActGroup); }
