// What q's strip-layout GEMM kernels share: the tile configuration, Linux's permission
// request, and the loops that run the weight strip by strip over the tokens, on AMX tiles
// where the CPU has them and on AVX-512 registers where it does not.
//
// Every kernel keeps its weight in 16-channel strips laid out as AMX's B operand: one
// 16 x 64-byte B tile per K step (K = 32 bf16 pairs, or K = 64 int8 quads), 1024 bytes
// each. A strip is used as it lies in memory (int8 W8A8, bf16) or widened to bf16 into a
// per-thread buffer first (the weight-only kernels). With tiles (tile_loop), two strips
// pass over 32 tokens at a time (two 16-row A tiles against two B tiles, four sum tiles).
// Without (vector_loop, AVX-512 BF16 / VNNI CPUs), each 64-byte row of a strip is one
// register of 16 channels that meets up to kVecTokens tokens' activation pairs (quads),
// broadcast, in vdpbf16ps (vpdpbusd): the same layout, so one copy of the weight serves
// both CPU classes. Either way the tokens are taken in chunks (kChunk, vector_chunk) whose
// activations stay in the core's L2 while every strip passes over them.
//
// Included by the kernels' .cpp files; q.kernels.cpp_build hashes it with each of them, so
// an edit here rebuilds them all.
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "bf16.h"

namespace q_amx {

struct TileConfig {  // the layout ldtilecfg reads (palette 1)
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tokens per chunk: 128 rows of activations (0.25-1.4 MB for K = 2048-5632) fit a 2 MB L2
constexpr int64_t kChunk = 128;
// K steps ahead that a strip read in place is prefetched: in an ad hoc A/B (the distance read
// from the environment in a throwaway build, bench_decode_gemms_cpu.py at 32 tokens, two
// runs each, not reproducible from the repo) 2 steps gave the bf16 kernel 103-106 ms per
// 1.1B step, none 110, 4: 111, 8: 115-120 — a few percent, within the machine's drift
constexpr int64_t kPrefetchSteps = 2;

// calls f(std::integral_constant<int, N>{}) for N = n, 1 <= n <= Max <= 8
template <int Max, class F>
void for_count(int64_t n, F f) {
  static_assert(Max >= 1 && Max <= 8, "up to 8");
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: if constexpr (Max >= 2) f(std::integral_constant<int, 2>{}); break;
    case 3: if constexpr (Max >= 3) f(std::integral_constant<int, 3>{}); break;
    case 4: if constexpr (Max >= 4) f(std::integral_constant<int, 4>{}); break;
    case 5: if constexpr (Max >= 5) f(std::integral_constant<int, 5>{}); break;
    case 6: if constexpr (Max >= 6) f(std::integral_constant<int, 6>{}); break;
    case 7: if constexpr (Max >= 7) f(std::integral_constant<int, 7>{}); break;
    default: if constexpr (Max >= 8) f(std::integral_constant<int, 8>{}); break;
  }
}

// 1-Max tokens (4 unless a kernel says otherwise) run each kernel's register path, compiled
// per token count: calls few(std::integral_constant<int, M>{}) and returns true for those
// M, false for others
template <int Max = 4, class Few>
bool few_tokens(int64_t M, Few few) {
  if (M < 1 || M > Max) return false;
  for_count<Max>(M, few);
  return true;
}

// f(s) for each of the N / 16 strips of an [N, K] weight, on `threads` threads where the
// weight is big enough to pay for waking them (the register paths of a few tokens)
template <class F>
void for_strips(int64_t N, int64_t K, int threads, F f) {
  const int64_t strips = N / 16;
  const int nt = N * K >= (1 << 18) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t s = 0; s < strips; ++s) f(s);
}

// f(s, m0, r) for each strip s of an [N, K] weight (for_strips) and, within it, each pass of
// up to Max tokens m0..m0 + r - 1 of M (r an integral constant): the weight-only kernels'
// register paths, whose later passes over a strip read it from the core's cache
template <int Max, class F>
void for_strip_passes(int64_t N, int64_t K, int64_t M, int threads, F f) {
  for_strips(N, K, threads, [&](int64_t s) {
    for (int64_t m0 = 0; m0 < M; m0 += Max)
      for_count<Max>(std::min<int64_t>(Max, M - m0), [&](auto r) { f(s, m0, r); });
  });
}

// The weight-only kernels' register paths (up to 32 / 16 tokens, 8 per pass) take the activations
// as 16-bit integers, so that the codes, widened to int16 only, meet them in vpdpwssd (32 products
// per instruction, summed exactly in int32) instead of being converted to fp32 for FMAs, which
// bounded those loops by the conversions, not by memory. Per token and block of `block` values: X =
// x * 2^(14 - E), E the exponent of the block's largest |x|, so |X| < 2^15. That is exact for every
// x within 2^7 of the block's largest (bf16 holds 8 significant bits); a smaller x is rounded to
// the nearest multiple of 2^(E - 14), off by at most 2^-15 of the block's largest |x|. A block with
// an inf or NaN gets a NaN unit, so its sums are NaN.
struct FixedPoint {
  std::vector<int16_t> x;    // [M][K]
  std::vector<float> unit;   // [M][K / block]: 2^(E - 14), what one step of X is worth
  std::vector<int32_t> sum;  // [M][K / block]: the block's sum of X
};

// 16 bf16 values (a multiple of 16 of them per block and per K here) as fp32 bits
inline __m512i bf16x16_bits(const uint16_t* p) {
  return _mm512_castps_si512(q_bf16::widen16(p));
}

// K and block multiples of 16
inline FixedPoint to_fixed_point(const uint16_t* xb, int64_t M, int64_t K, int64_t block) {
  const int64_t blocks = (K + block - 1) / block;
  FixedPoint a{std::vector<int16_t>(M * K), std::vector<float>(M * blocks),
               std::vector<int32_t>(M * blocks)};
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t k0 = b * block, k1 = std::min(K, k0 + block);
      const uint16_t* x = xb + m * K;
      int16_t* out = a.x.data() + m * K;
      // the largest |x| as bits: for non-negative floats the integer order is the float
      // order, with inf and then NaN above every finite number
      __m512i top = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 16)
        top = _mm512_max_epu32(top, _mm512_and_si512(bf16x16_bits(x + k), magnitude));
      const uint32_t bits = _mm512_reduce_max_epu32(top);
      const int biased = static_cast<int>(bits >> 23);  // E + 127 for a normal largest
      int32_t sum = 0;
      float unit = 1.f;  // an all-zero block: X = 0, any unit
      if (bits >= 0x7F800000u) {
        unit = std::numeric_limits<float>::quiet_NaN();  // X stays 0
      } else if (biased >= 14) {  // 2^(14 - E) = 2^(141 - biased) is a normal float
        unit = std::ldexp(1.f, biased - 141);
        const __m512 scale = _mm512_set1_ps(std::ldexp(1.f, 141 - biased));
        __m512i sums = _mm512_setzero_si512();
        for (int64_t k = k0; k < k1; k += 16) {  // exact products, rounded to nearest even
          const __m512i q = _mm512_cvtps_epi32(
              _mm512_mul_ps(_mm512_castsi512_ps(bf16x16_bits(x + k)), scale));
          sums = _mm512_add_epi32(sums, q);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm512_cvtepi32_epi16(q));
        }
        sum = _mm512_reduce_add_epi32(sums);
      } else if (bits != 0) {  // |x| < 2^-113: 2^(14 - E) passes float's range, so in double
        const double to_int = std::ldexp(1.0, 141 - std::max(biased, 1));
        unit = static_cast<float>(std::ldexp(1.0, std::max(biased, 1) - 141));
        for (int64_t k = k0; k < k1; ++k) {
          out[k] = static_cast<int16_t>(std::nearbyint(q_bf16::from_bf16(x[k]) * to_int));
          sum += out[k];
        }
      }
      a.unit[m * blocks + b] = unit;
      a.sum[m * blocks + b] = sum;
    }
  }
  return a;
}

// (X[k], X[k + 1]) of a token as one 32-bit lane, broadcast: the pair vpdpwssd multiplies
// with a channel's two codes
inline __m512i pair_at(const int16_t* x) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  return _mm512_set1_epi32(pair);
}

#if defined(__AMX_TILE__)
// tiles 0-3: 16 x 16 fp32 / int32 sums of `rows` tokens, C[token tile t][strip j] = 2t + j;
// 4 and 5: the two token tiles' activations (`rows` x 64 bytes); 6 and 7: the two strips'
// B tiles (16 x 64 bytes)
inline void configure(int rows) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(t < 6 ? rows : 16);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// The four products of a pass, for tile_loop's `dot(i)`: C[i] += A[i / 2] . B[i % 2].
// `op` is _tile_dpbf16ps or _tile_dpbssd, which take tile numbers as literal tokens.
#define Q_AMX_DOTS(op)                         \
  [](int i) {                                  \
    switch (i) {                               \
      case 0: op(0, 4, 6); break;              \
      case 1: op(1, 4, 7); break;              \
      case 2: op(2, 5, 6); break;              \
      default: op(3, 5, 7); break;             \
    }                                          \
  }

// 0 when this process may use AMX tiles (Linux grants the tile state per process)
inline int request_permission() {
  return static_cast<int>(syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                  18 /* XFEATURE_XTILEDATA */));
}

// y = x @ strip^T for M tokens and `strips` strips of `steps` K steps, on `threads` threads.
// Each pass takes two strips and 32 tokens into the four sum tiles, so every tile loaded
// serves two products (one strip and 32 tokens: a token tile loaded from L2 per product
// and a half, and prefill was bound by those loads).
//   x: M rows of x_row bytes, 64 bytes of them per K step.
//   strip_of(s, buffer): the strip's B tiles (steps x 1024 bytes, 64-byte rows); `buffer`
//     is the thread's own, 64-byte aligned, of buffer_bytes (0: the kernel reads in place).
//   dot(i): Q_AMX_DOTS(the kernel's tile product).
//   store(sums, m, s): token m's 16 sums (64 bytes) for strip s, to the output.
template <class StripOf, class Dot, class Store>
void tile_loop(const char* x, int64_t x_row, int64_t M, int64_t strips, int64_t steps,
               int64_t buffer_bytes, int threads, StripOf strip_of, Dot dot, Store store) {
  const int64_t pairs = (strips + 1) / 2;
  const int nt = pairs > 1 ? threads : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<char> buffer(2 * buffer_bytes + 64);
    char* own = reinterpret_cast<char*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    alignas(64) char sums[16 * 64];
    int configured = 0;
    for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
      const int64_t c1 = M - c0 < kChunk ? M : c0 + kChunk;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t s0 = 2 * p;
        const bool two = s0 + 1 < strips;  // an odd last strip passes alone
        const char* b0 = strip_of(s0, own);
        const char* b1 = two ? strip_of(s0 + 1, own + buffer_bytes) : nullptr;
        for (int64_t m0 = c0; m0 < c1; m0 += 32) {  // 32 tokens per pass over the strips
          const int64_t left = c1 - m0;
          const int64_t rows0 = left < 16 ? left : 16;
          const int64_t rows1 = left <= 16 ? 0 : (left - 16 < 16 ? left - 16 : 16);
          if (configured != rows0) {
            configure(static_cast<int>(rows0));
            configured = static_cast<int>(rows0);
          }
          // the second token tile also loads 16 tokens: on a last pass of 17-31 it takes
          // the last 16 (overlapping the first tile's, which it computes to the same bits)
          const int64_t t1 = m0 + (rows1 == 16 ? 16 : rows1);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          const bool stream = buffer_bytes == 0 && m0 == c0;  // the strips come from memory
          for (int64_t k = 0; k < steps; ++k) {
            if (stream)  // their tiles kPrefetchSteps K steps ahead
              for (int line = 0; line < 16; ++line) {
                _mm_prefetch(b0 + (k + kPrefetchSteps) * 1024 + line * 64, _MM_HINT_T0);
                if (two)
                  _mm_prefetch(b1 + (k + kPrefetchSteps) * 1024 + line * 64, _MM_HINT_T0);
              }
            _tile_loadd(6, b0 + k * 1024, 64);
            _tile_loadd(4, x + m0 * x_row + k * 64, x_row);
            dot(0);
            if (two) {
              _tile_loadd(7, b1 + k * 1024, 64);
              dot(1);
            }
            if (rows1) {
              _tile_loadd(5, x + t1 * x_row + k * 64, x_row);
              dot(2);
              if (two) dot(3);
            }
          }
          for (int j = 0; j < (two ? 2 : 1); ++j) {
            if (j == 0) _tile_stored(0, sums, 64); else _tile_stored(1, sums, 64);
            for (int64_t i = 0; i < rows0; ++i) store(sums + i * 64, m0 + i, s0 + j);
            if (!rows1) continue;
            if (j == 0) _tile_stored(2, sums, 64); else _tile_stored(3, sums, 64);
            for (int64_t i = 0; i < 16; ++i) store(sums + i * 64, t1 + i, s0 + j);
          }
        }
      }
    }
    if (configured) _tile_release();
  }
}

#else
// no tiles on this CPU (the kernel runs vector_loop): there is no tile state to ask for
inline int request_permission() { return 0; }
#endif

// ---- Without tiles: the strips on AVX-512 registers ----

// A pass takes up to kVecStrips strips and kVecTokens tokens (R x S accumulators): each row
// step loads the strips' rows once and each token's pair (quad) once for all of them. On a
// 2-core AMD EPYC 6 x 4 and 4 x 4 ran slower than 8 x 1 (bf16 and int8, 8-2048 tokens), and
// 8 x 2 faster, bf16 most: 4-9% over a 1.1B model's weights at 8-1024 tokens, 5-15% over
// SmolLM2's at 8, 256 and 2048 but 3% slower at 32; int8 1-15% faster but 3-11% slower on
// SmolLM2 at 32-256 (tests/bench/ab_vector_passes.py builds the variants with -D and times
// them; docs/benchmarks.md)
#ifndef Q_VEC_TOKENS
#define Q_VEC_TOKENS 8
#endif
#ifndef Q_VEC_STRIPS
#define Q_VEC_STRIPS 2
#endif
constexpr int kVecTokens = Q_VEC_TOKENS;
constexpr int kVecStrips = Q_VEC_STRIPS;
// Tokens per chunk: as many rows of activations as fill kVecChunkBytes, in multiples of
// kVecTokens, at least kChunk (128). Every chunk streams the whole weight again: a
// 2048-token prefill step with K = 576 (SmolLM2) read it 16 times in chunks of 128 tokens,
// 5 times in chunks of this size. Half of a 1 MB L2 (AMD Zen 4), the other half for the
// strips and the output rows. A weight above kVecLargeWeight does not stay in the L3
// between chunks, so each chunk's first pass over a strip waits on DRAM; its chunks are
// kVecLargeChunkBytes, the activations then read from L3 (two cores need 2 bytes of them per
// cycle at the vdpbf16ps rate). On a 2-core AMD EPYC (32 MB L3), 2 MB chunks made a 1.1B
// model's bf16 GEMMs at 2048 tokens 4.5% faster but SmolLM2's, whose weights fit in L3,
// 1.4-3.8% slower (tests/bench/ab_vector_passes.py, docs/benchmarks.md).
#ifndef Q_VEC_CHUNK_BYTES
#define Q_VEC_CHUNK_BYTES (1 << 19)
#endif
#ifndef Q_VEC_LARGE_WEIGHT
#define Q_VEC_LARGE_WEIGHT (16 << 20)
#endif
#ifndef Q_VEC_LARGE_CHUNK_BYTES
#define Q_VEC_LARGE_CHUNK_BYTES (2 << 20)
#endif
constexpr int64_t kVecChunkBytes = Q_VEC_CHUNK_BYTES;
constexpr int64_t kVecLargeWeight = Q_VEC_LARGE_WEIGHT;
constexpr int64_t kVecLargeChunkBytes = Q_VEC_LARGE_CHUNK_BYTES;
// x_row: bytes of one token's activations; weight_bytes: what one chunk streams from memory
// (the codes where strips are widened from them)
inline int64_t vector_chunk(int64_t x_row, int64_t weight_bytes) {
  const int64_t bytes = weight_bytes > kVecLargeWeight ? kVecLargeChunkBytes : kVecChunkBytes;
  const int64_t rows = bytes / x_row / kVecTokens * kVecTokens;
  return rows < kChunk ? kChunk : rows;
}

// f(R, S) as integral constants for n tokens and ns strips of a pass
template <class F>
void for_pass(int64_t n, int64_t ns, F f) {
  for_count<kVecTokens>(n, [&](auto r) { for_count<kVecStrips>(ns, [&](auto s) { f(r, s); }); });
}

// While a group of strips is multiplied from the cache, the next group's lines are fetched
// into L2, spread over the passes after the first: otherwise every group's first pass waits
// on memory while the later ones leave the memory bus idle (a 1.1B model's bf16 GEMMs at 32
// tokens ran at 59-70% of the vdpbf16ps rate, profile_engine_cpu.py --requests 32 --parts).
// Only for strips read in place (bf16, int8 W8A8) and calls of 2 to kVecPrefetchPasses passes
// (decode batches). On a 2-core AMD EPYC (tests/bench/ab_vector_passes.py, variants with
// Q_VEC_PREFETCH_PASSES=0 for none), over a 1.1B model's and SmolLM2's weights: 16 tokens
// 20-21% faster (bf16) and 24% (int8), 32 tokens 4-6% and 5-8%; at 64 bf16 was 2-4% slower
// (int8 1-4% faster), so from 64 tokens on, and over a prompt's long chunks, the first pass's
// wait is left as it is. Strips widened or regrouped into a buffer first do not prefetch:
// wint4's widened strips ran 6-17% slower at 32 tokens with it (twelfth session,
// bench_decode_gemms_cpu.py --tokens 32), and wint8's are widened from 33 tokens only.
#ifndef Q_VEC_PREFETCH_PASSES
#define Q_VEC_PREFETCH_PASSES 4
#endif
constexpr int64_t kVecPrefetchPasses = Q_VEC_PREFETCH_PASSES;

// What a pass prefetches of the next group: at its row steps r < count, line r of next[j]
struct NextLines {
  const char* next[kVecStrips];
  int64_t count;
};

// sums[m][j] = token m's 16 sums against strip j, for R tokens and S strips: each 64-byte
// row r of each strip meets each token's 4 bytes at x + m * x_row + 4 r (a bf16 pair, or 4
// int8 codes), broadcast, in dot(acc, x4, row) (vdpbf16ps or vpdpbusd on the bits), for
// `steps` rows. The accumulators hold fp32 or int32 bits alike; so does `sums`. The strips
// are prefetched 4 KB ahead (they stream from memory on a chunk's first pass), and with
// Prefetch the next group as `pf` says.
template <int R, int S, bool Prefetch, class Dot>
inline void dot_rows(const char* x, int64_t x_row, const char* const* b, int64_t steps,
                     float (*sums)[kVecStrips][16], const NextLines& pf, Dot dot) {
  __m512i acc[R][S];
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < S; ++j) acc[m][j] = _mm512_setzero_si512();
  for (int64_t r = 0; r < steps; ++r) {
    __m512i w[S];
    for (int j = 0; j < S; ++j) {
      _mm_prefetch(b[j] + r * 64 + 4096, _MM_HINT_T0);
      if constexpr (Prefetch)
        if (r < pf.count) _mm_prefetch(pf.next[j] + r * 64, _MM_HINT_T1);
      w[j] = _mm512_loadu_si512(b[j] + r * 64);
    }
    for (int m = 0; m < R; ++m) {
      int32_t four;
      std::memcpy(&four, x + m * x_row + 4 * r, sizeof four);
      const __m512i xv = _mm512_set1_epi32(four);
      for (int j = 0; j < S; ++j) acc[m][j] = dot(acc[m][j], xv, w[j]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < S; ++j) _mm512_store_si512(sums[m][j], acc[m][j]);
}

// tile_loop's job without tiles, on `threads` threads: chunk by chunk of tokens, up to
// kVecStrips strips (strip_of, as for tile_loop; each with a buffer of its own) pass over
// the chunk kVecTokens tokens at a time (dot_rows). x: M rows of x_row bytes, 4 of them per
// row step of the strips (`steps` of 64 bytes); dot(acc, x4, row) the kernel's instruction;
// store(sums, m, s) as for tile_loop. Prefetch: the next group's strips during a group's
// later passes (the comment above; only where vector_loop asks, so the strips are read in
// place and the call is one chunk of 2 or more passes).
template <bool Prefetch, class StripOf, class Dot, class Store>
void vector_passes(const char* x, int64_t x_row, int64_t M, int64_t strips, int64_t steps,
                   int64_t buffer_bytes, int threads, int64_t chunk, StripOf strip_of,
                   Dot dot, Store store) {
  const int64_t groups = (strips + kVecStrips - 1) / kVecStrips;
  const int nt = groups > 1 ? threads : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<char> buffer(kVecStrips * buffer_bytes + 64);
    char* own = reinterpret_cast<char*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    alignas(64) float sums[kVecTokens][kVecStrips][16];
    const char* b[kVecStrips];
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = M - c0 < chunk ? M : c0 + chunk;
      const int64_t passes = (c1 - c0 + kVecTokens - 1) / kVecTokens;
      // each later pass asks for a run of the next group's lines (`steps` per strip)
      const int64_t run = Prefetch ? (steps + passes - 2) / (passes - 1) : 0;
#pragma omp for schedule(static)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t s0 = g * kVecStrips;
        const int64_t ns = strips - s0 < kVecStrips ? strips - s0 : kVecStrips;
        for (int64_t j = 0; j < ns; ++j) b[j] = strip_of(s0 + j, own + j * buffer_bytes);
        // the next group's strips (the last strip again where it has fewer), read in place
        NextLines pf{};
        const bool ahead = Prefetch && g + 1 < groups;
        for (int j = 0; ahead && j < kVecStrips; ++j)
          pf.next[j] = strip_of(std::min<int64_t>(s0 + kVecStrips + j, strips - 1), nullptr);
        for (int64_t m0 = c0, p = 0; m0 < c1; m0 += kVecTokens, ++p) {
          const int64_t n = c1 - m0 < kVecTokens ? c1 - m0 : kVecTokens;
          if (ahead && p > 0) {  // pass p asks for lines [(p - 1) run, p run)
            const int64_t first = (p - 1) * run;
            pf.count = std::max<int64_t>(0, std::min(run, steps - first));
            for (int j = 0; j < kVecStrips && p > 1; ++j) pf.next[j] += run * 64;
          }
          for_pass(n, ns, [&](auto r, auto s) {
            dot_rows<decltype(r)::value, decltype(s)::value, Prefetch>(x + m0 * x_row, x_row, b,
                                                                       steps, sums, pf, dot);
          });
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < ns; ++j)
              store(reinterpret_cast<const char*>(sums[i][j]), m0 + i, s0 + j);
        }
      }
    }
  }
}

// vector_passes for a call. stream_bytes: what one strip streams from memory (its codes
// where strip_of widens or regroups them into a buffer), for the token chunks. The calls that
// prefetch (strips read in place, one chunk of 2 to kVecPrefetchPasses passes) run an
// instantiation of their own and everything else (prompts) one without that code, so that a
// prompt runs the loop it ran before the prefetch existed: with both in one function, a
// 256-token wint4 prompt ran 15% slower on a 2-core AMD EPYC though it never prefetched
// (twelfth session).
template <class StripOf, class Dot, class Store>
void vector_loop(const char* x, int64_t x_row, int64_t M, int64_t strips, int64_t steps,
                 int64_t buffer_bytes, int threads, int64_t stream_bytes, StripOf strip_of,
                 Dot dot, Store store) {
  const int64_t chunk = vector_chunk(x_row, strips * stream_bytes);
  const int64_t passes = ((M < chunk ? M : chunk) + kVecTokens - 1) / kVecTokens;
  if (buffer_bytes == 0 && M <= chunk && passes > 1 && passes <= kVecPrefetchPasses)
    vector_passes<true>(x, x_row, M, strips, steps, buffer_bytes, threads, chunk, strip_of,
                        dot, store);
  else
    vector_passes<false>(x, x_row, M, strips, steps, buffer_bytes, threads, chunk, strip_of,
                         dot, store);
}

#if defined(__AVX512BF16__)
// The bf16 kernels' GEMM for 5+ tokens: x [M, K] bf16 against bf16 strips (strip_of), on
// tiles where the CPU has them, else on registers; store(sums, m, s) as for tile_loop
template <class StripOf, class Store>
void bf16_gemm(const uint16_t* x, int64_t M, int64_t K, int64_t strips, int64_t buffer_bytes,
               int threads, int64_t stream_bytes, StripOf strip_of, Store store) {
#if defined(__AMX_TILE__)
  tile_loop(reinterpret_cast<const char*>(x), K * 2, M, strips, K / 32, buffer_bytes, threads,
            strip_of, Q_AMX_DOTS(_tile_dpbf16ps), store);
#else
  vector_loop(reinterpret_cast<const char*>(x), K * 2, M, strips, K / 2, buffer_bytes,
              threads, stream_bytes, strip_of,
              [](__m512i acc, __m512i x2, __m512i row) {
                return _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(acc),
                                                            (__m512bh)x2, (__m512bh)row));
              },
              store);
#endif
}
#endif

}  // namespace q_amx
