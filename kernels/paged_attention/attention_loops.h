// The loops q's CPU attention kernels (paged_attention.cpp) are made of: a block of keys
// scored against R query rows, the softmax's exp, the weighted sum of values for R rows, and
// their register-held bf16 versions for AVX-512. One query row is one (query token, head)
// pair: decode scores a sequence's group of heads, prefill a tile of positions x heads.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../bf16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// bit casts through a union: GCC vectorizes loops with these, not with memcpy
inline float bits_to_float(uint32_t u) {
  union { uint32_t u; float f; } c;
  c.u = u;
  return c.f;
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) { return q_bf16::from_bf16(x); }

// exp for x <= 0 (scores minus their maximum), vectorizable (libm's expf is not, without
// -ffast-math, nor is std::floor): exp(x) = 2^k exp(r), k = x / ln2 rounded to the nearest
// integer (adding 1.5 * 2^23 rounds), r = x - k ln2 in [-ln2/2, ln2/2], exp(r) by its Taylor
// polynomial to degree 7 (relative error below 2e-7, about 2 ulp); below -87 it gives ~1e-38
// where the exact value is as negligible.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  constexpr float shifter = 12582912.f;
  const float k = (x * 1.44269504f + shifter) - shifter;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
}

// Software prefetch of n elements from p, into L2 (a unit's 80 KB of keys and values for
// SmolLM2 at 320 tokens do not fit a 32-48 KB L1: asked into L1 they evicted each other;
// into L2 a layer's call took 0.80-0.84 ms against 0.93, from memory, on a 2-core AMD EPYC:
// bench_paged_attention.py --layers 30 --batches 32 --contexts 320, measured before the
// register-held bf16 loops below and not since)
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(c + off, 0, 2);
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// KV head h's part of cache block `block`, `per_head` elements: keys [D][bs] of the
// [blocks, kvH, D, bs] key cache, values [bs][DV] of the [blocks, kvH, bs, DV] value cache
template <typename T>
inline const T* head_block(const T* cache, int64_t block, int64_t kvH, int64_t h,
                           int64_t per_head) {
  return cache + (block * kvH + h) * per_head;
}

// position p's value row for KV head h, in a sequence's blocks `table` of the value cache
template <typename T>
inline const T* value_row(const T* v_cache, const int64_t* table, int64_t p, int64_t bs,
                          int64_t kvH, int64_t h, int64_t DV) {
  return head_block(v_cache, table[p / bs], kvH, h, bs * DV) + p % bs * DV;
}

// s[t] = part[t] * post (Gemma 2's soft-capping: tanh(that / softcap) * softcap) for t in
// [lo, hi): a block's raw scores, scaled where the query was not
inline void store_scores(const float* part, float* s, int64_t lo, int64_t hi, float post,
                         float softcap) {
  if (softcap > 0.f) {
    for (int64_t t = lo; t < hi; ++t) s[t] = std::tanh(part[t] * post / softcap) * softcap;
  } else {  // (x * 1.f is x: loops that scaled the query keep their scores' bits)
#pragma omp simd
    for (int64_t t = lo; t < hi; ++t) s[t] = part[t] * post;
  }
}

// A row's softmax weights in place, unnormalized: exp(s - max) over the visible [lo, hi),
// 0 over the rest of [0, n) (positions the pair loops read but the row does not see); the
// sum of the weights, to divide the weighted sum by
inline float softmax_weights(float* s, int64_t lo, int64_t hi, int64_t n) {
  float top = -INFINITY;
#pragma omp simd reduction(max : top)
  for (int64_t t = lo; t < hi; ++t) top = s[t] > top ? s[t] : top;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = lo; t < hi; ++t) {
    s[t] = exp_nonpositive(s[t] - top);
    sum += s[t];
  }
  std::fill(s, s + lo, 0.f);
  std::fill(s + hi, s + n, 0.f);
  return sum;
}

constexpr int64_t LANES = 16;  // positions per accumulator (one AVX-512 register of fp32)

// part[j][t] = q[j] . key[t] for the padded query heads j and the bs positions t of one
// block, R heads at a time; bs is a multiple of LANES (the engine's blocks are 64). The
// keys are read as stored ([D][bs], bf16 widened in registers): each 16-position load
// feeds R multiply-adds, and no fp32 copy of the block is written and read back
template <int R, typename T>
void block_scores(const float* q, const T* keys, float* part, int64_t heads, int64_t D,
                  int64_t bs) {
  for (int64_t j0 = 0; j0 < heads; j0 += R) {
    for (int64_t t0 = 0; t0 < bs; t0 += LANES) {
      float acc[R][LANES] = {};
      for (int64_t i = 0; i < D; ++i) {
        const T* k = keys + i * bs + t0;
        float kf[LANES];
#pragma omp simd
        for (int64_t l = 0; l < LANES; ++l) kf[l] = to_float(k[l]);
        for (int r = 0; r < R; ++r) {
          const float qi = q[(j0 + r) * D + i];
#pragma omp simd
          for (int64_t l = 0; l < LANES; ++l) acc[r][l] += qi * kf[l];
        }
      }
      for (int r = 0; r < R; ++r)
        std::memcpy(part + (j0 + r) * bs + t0, acc[r], sizeof acc[r]);
    }
  }
}

// acc[j][:] = sum over the n positions t of w[j][t] * value[t][:], R heads at a time: one
// pass over the positions, a block at a time (no division per position); each value row
// is read from L1 once per CHUNK of its elements, each feeding R multiply-adds
constexpr int64_t CHUNK = 32;

template <int R, typename T>
void weighted_sum(const float* w, const T* v_cache, const int64_t* table, int64_t first,
                  int64_t n, int64_t h, int64_t kvH, int64_t DV, int64_t bs, int64_t heads,
                  float* acc) {
  for (int64_t j0 = 0; j0 < heads; j0 += R) {
    float* a = acc + j0 * DV;
    std::memset(a, 0, sizeof(float) * R * DV);
    for (int64_t blk = first / bs; blk * bs < first + n; ++blk) {
      const int64_t lo = std::max(first, blk * bs), hi = std::min(first + n, (blk + 1) * bs);
      const T* rows = head_block(v_cache, table[blk], kvH, h, bs * DV);
      for (int64_t d0 = 0; d0 < DV; d0 += CHUNK) {  // accumulators stay in registers
        const int64_t width = std::min(CHUNK, DV - d0);
        float part[R][CHUNK] = {};
        float v[CHUNK] = {};
        for (int64_t p = lo; p < hi; ++p) {
          const T* src = rows + (p - blk * bs) * DV + d0;
          if (width == CHUNK)
            load_row(src, v, CHUNK);
          else
            for (int64_t l = 0; l < width; ++l) v[l] = to_float(src[l]);
          for (int r = 0; r < R; ++r) {
            const float wr = w[(j0 + r) * n + p - first];
#pragma omp simd
            for (int64_t l = 0; l < CHUNK; ++l) part[r][l] += wr * v[l];
          }
        }
        for (int r = 0; r < R; ++r)
          for (int64_t l = 0; l < width; ++l) a[r * DV + d0 + l] += part[r][l];
      }
    }
  }
}

#if defined(__AVX512F__)
// bf16 caches on AVX-512 (blocks of a multiple of 32 positions, values of a multiple of 64
// columns: the engine's 64 and Llama-style heads): the two loops above with their
// accumulators held in registers, 32 positions (scores) and 64 value columns (weighted sum)
// per pass, so that each widened key or value feeds R heads' multiply-adds from registers.
using q_bf16::widen16;  // 16 bf16 -> 16 fp32

template <int R>
void block_scores_bf16(const float* q, const uint16_t* keys, float* part, int64_t heads,
                       int64_t D, int64_t bs) {
  for (int64_t j0 = 0; j0 < heads; j0 += R) {
    for (int64_t t0 = 0; t0 < bs; t0 += 2 * LANES) {  // 32 positions: 2 R accumulators
      __m512 a0[R], a1[R];
      for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; ++i) {
        const __m512 k0 = widen16(keys + i * bs + t0), k1 = widen16(keys + i * bs + t0 + 16);
        for (int r = 0; r < R; ++r) {
          const __m512 qi = _mm512_set1_ps(q[(j0 + r) * D + i]);
          a0[r] = _mm512_fmadd_ps(qi, k0, a0[r]);
          a1[r] = _mm512_fmadd_ps(qi, k1, a1[r]);
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm512_storeu_ps(part + (j0 + r) * bs + t0, a0[r]);
        _mm512_storeu_ps(part + (j0 + r) * bs + t0 + 16, a1[r]);
      }
    }
  }
}

template <int R>
void weighted_sum_bf16(const float* w, const uint16_t* v_cache, const int64_t* table,
                       int64_t first, int64_t n, int64_t h, int64_t kvH, int64_t DV, int64_t bs,
                       int64_t heads, float* acc) {
  for (int64_t j0 = 0; j0 < heads; j0 += R) {
    for (int64_t d0 = 0; d0 < DV; d0 += 64) {  // 64 value columns: 4 registers per head
      __m512 a[R][4];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
      for (int64_t blk = first / bs; blk * bs < first + n; ++blk) {
        const int64_t lo = std::max(first, blk * bs), hi = std::min(first + n, (blk + 1) * bs);
        const uint16_t* rows = head_block(v_cache, table[blk], kvH, h, bs * DV) + d0;
        for (int64_t p = lo; p < hi; ++p) {
          const uint16_t* src = rows + (p - blk * bs) * DV;
          const __m512 v0 = widen16(src), v1 = widen16(src + 16), v2 = widen16(src + 32),
                       v3 = widen16(src + 48);
          for (int r = 0; r < R; ++r) {
            const __m512 wr = _mm512_set1_ps(w[(j0 + r) * n + p - first]);
            a[r][0] = _mm512_fmadd_ps(wr, v0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(wr, v1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(wr, v2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(wr, v3, a[r][3]);
          }
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c)
          _mm512_storeu_ps(acc + (j0 + r) * DV + d0 + 16 * c, a[r][c]);
    }
  }
}
#endif

// f(integral_constant<int, R>) for R = rows (1-4)
template <class F>
void with_rows(int64_t rows, F f) {
  switch (rows) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// block_scores / weighted_sum for `padded` rows, R = `rows` (1-4) at a time: the
// register-held bf16 loops where `vec` (bf16 caches on AVX-512, bs % 32 == 0, DV % 64 == 0)
template <typename T>
void score_block(int64_t rows, bool vec, const float* q, const T* keys, float* part,
                 int64_t padded, int64_t D, int64_t bs) {
  with_rows(rows, [&](auto r) {
    constexpr int R = decltype(r)::value;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, uint16_t>::value)
      if (vec) return block_scores_bf16<R>(q, keys, part, padded, D, bs);
#endif
    (void)vec;
    block_scores<R>(q, keys, part, padded, D, bs);
  });
}

template <typename T>
void sum_values(int64_t rows, bool vec, const float* w, const T* v_cache, const int64_t* table,
                int64_t first, int64_t n, int64_t h, int64_t kvH, int64_t DV, int64_t bs,
                int64_t padded, float* acc) {
  with_rows(rows, [&](auto r) {
    constexpr int R = decltype(r)::value;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, uint16_t>::value)
      if (vec)
        return weighted_sum_bf16<R>(w, v_cache, table, first, n, h, kvH, DV, bs, padded, acc);
#endif
    (void)vec;
    weighted_sum<R>(w, v_cache, table, first, n, h, kvH, DV, bs, padded, acc);
  });
}

using q_bf16::to_bf16;  // c10::BFloat16's rounding
inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) { *p = to_bf16(x); }


#if defined(__AVX512BF16__)
// Prefill's bf16 loops (many query rows per key): vdpbf16ps multiplies bf16 pairs and adds
// both products to an fp32 lane, twice the multiply-adds per instruction of the loops above,
// and reads keys and values as stored (no widening). The pairs run along the sum: two key
// dimensions for the scores (a query row's bf16 values are its pairs as stored), two
// positions for the weighted sum (weights rounded to bf16, as torch's flash attention
// rounds them for its second GEMM). unpacklo/hi_epi16 interleave two 32-element rows; fp32
// element 4l + m of the lo half is then output 8l + m, of the hi half 8l + 4 + m (l: the
// 128-bit lane), and `unshuffle` stores the 32 outputs in order.
inline void unshuffle(__m512 lo, __m512 hi, float* out) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
}

inline __m512i load32(const uint16_t* p) { return _mm512_loadu_si512(p); }

// part[r][t] = q_r . key_t for `rows` query rows of D / 2 bf16 pairs (unscaled) and the bs
// positions of a block's [D][bs] keys (D even, bs a multiple of 32); `next`, when given, is
// the block to ask for while this one is scored (decode, where keys come from memory)
template <int R>
void block_scores_dp(const uint32_t* q, const uint16_t* keys, float* part, int64_t rows,
                     int64_t D, int64_t bs, const uint16_t* next = nullptr) {
  const int64_t pairs = D / 2;
  for (int64_t j0 = 0; j0 < rows; j0 += R) {
    for (int64_t t0 = 0; t0 < bs; t0 += 32) {
      __m512 lo[R], hi[R];
      for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < pairs; ++i) {
        // the next block's same lines, a block ahead, into L2 as the values are. Into L1 (a
        // unit's keys and values do not fit) a layer of 32 sequences took 0.39-0.43 ms
        // against 0.37-0.44, 0.37-0.38 in four runs of five (SmolLM2's shape, 320 tokens),
        // and 0.65-0.72 against 0.57-0.64 (TinyLlama's), on a 2-core AMD EPYC
        // (bench_paged_attention.py --layers 30 --batches 32, builds alternated; thirteenth
        // session); SmolLM2's 32-request decode step 38.5 / 42.8 ms against 37.8 / 39.2
        // (profile_engine_cpu.py --requests 32 --loop 60)
        if (next != nullptr && j0 == 0) {
          __builtin_prefetch(next + 2 * i * bs + t0, 0, 2);
          __builtin_prefetch(next + (2 * i + 1) * bs + t0, 0, 2);
        }
        const __m512i a = load32(keys + 2 * i * bs + t0), b = load32(keys + (2 * i + 1) * bs + t0);
        const __m512bh klo = (__m512bh)_mm512_unpacklo_epi16(a, b);
        const __m512bh khi = (__m512bh)_mm512_unpackhi_epi16(a, b);
        for (int r = 0; r < R; ++r) {
          const __m512bh qi = (__m512bh)_mm512_set1_epi32(q[(j0 + r) * pairs + i]);
          lo[r] = _mm512_dpbf16_ps(lo[r], klo, qi);
          hi[r] = _mm512_dpbf16_ps(hi[r], khi, qi);
        }
      }
      for (int r = 0; r < R; ++r) unshuffle(lo[r], hi[r], part + (j0 + r) * bs + t0);
    }
  }
}

// acc[r][:] = sum over the positions [first, first + 2 * npairs) of w[r][p] * value[p][:],
// first even, weights as bf16 pairs (w[r][k]: positions first + 2k, first + 2k + 1), DV a
// multiple of 64; a position past `last` is read as zeros. `ahead` > 0 asks for the value
// rows that many positions on (decode, where they come from memory)
template <int R>
void weighted_sum_dp(const uint32_t* w, const uint16_t* v_cache, const int64_t* table,
                     int64_t first, int64_t npairs, int64_t last, int64_t h, int64_t kvH,
                     int64_t DV, int64_t bs, int64_t rows, float* acc, int64_t ahead = 0) {
  const int64_t end = first + 2 * npairs;
  for (int64_t j0 = 0; j0 < rows; j0 += R) {
    for (int64_t d0 = 0; d0 < DV; d0 += 64) {
      __m512 a[R][4];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
      for (int64_t blk = first / bs; blk * bs < end; ++blk) {
        const int64_t lo = std::max(first, blk * bs), hi = std::min(end, (blk + 1) * bs);
        const uint16_t* rows_ = head_block(v_cache, table[blk], kvH, h, bs * DV) + d0;
        for (int64_t p = lo; p < hi; p += 2) {  // bs is even: p, p + 1 share the block
          // rows p + ahead and p + ahead + 1, side by side in one block (ahead is even)
          if (ahead > 0 && j0 == 0 && d0 == 0 && p + ahead + 1 <= last)
            prefetch(value_row(v_cache, table, p + ahead, bs, kvH, h, DV), 2 * DV);
          const uint16_t* x = rows_ + (p - blk * bs) * DV;
          const bool second = p + 1 <= last;
          const __m512i x0 = load32(x), x1 = load32(x + 32);
          const __m512i y0 = second ? load32(x + DV) : _mm512_setzero_si512();
          const __m512i y1 = second ? load32(x + DV + 32) : _mm512_setzero_si512();
          const __m512bh v[4] = {(__m512bh)_mm512_unpacklo_epi16(x0, y0),
                                 (__m512bh)_mm512_unpackhi_epi16(x0, y0),
                                 (__m512bh)_mm512_unpacklo_epi16(x1, y1),
                                 (__m512bh)_mm512_unpackhi_epi16(x1, y1)};
          const int64_t k = (p - first) / 2;
          for (int r = 0; r < R; ++r) {
            const __m512bh wr = (__m512bh)_mm512_set1_epi32(w[(j0 + r) * npairs + k]);
            for (int c = 0; c < 4; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], v[c], wr);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        unshuffle(a[r][0], a[r][1], acc + (j0 + r) * DV + d0);
        unshuffle(a[r][2], a[r][3], acc + (j0 + r) * DV + d0 + 32);
      }
    }
  }
}

// n fp32 weights (n even) -> n / 2 bf16 pairs, round to nearest even
inline void to_bf16_pairs(const float* w, int64_t n, uint32_t* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)  // cvtne2ps_pbh(a, b): b's 16 values first, then a's
    _mm512_storeu_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(w + i + 16),
                                                                   _mm512_loadu_ps(w + i)));
  for (; i < n; i += 2)
    out[i / 2] = static_cast<uint32_t>(to_bf16(w[i])) |
                 static_cast<uint32_t>(to_bf16(w[i + 1])) << 16;
}

// acc[r][:] for `rows` rows of n softmax weights each (n even: positions [first, first + n),
// past `last` read as zeros), R rows at a time: the weights rounded to bf16 pairs in
// `wpairs` (padded * n / 2; rows from `rows` to `padded` weighted 0), then weighted_sum_dp
// (`ahead`: as there)
inline void weighted_sum_pairs(int64_t R, const float* w, int64_t rows, int64_t padded,
                               int64_t n, uint32_t* wpairs, const uint16_t* v_cache,
                               const int64_t* table, int64_t first, int64_t last, int64_t h,
                               int64_t kvH, int64_t DV, int64_t bs, float* acc,
                               int64_t ahead = 0) {
  for (int64_t r = 0; r < rows; ++r) to_bf16_pairs(w + r * n, n, wpairs + r * n / 2);
  std::fill(wpairs + rows * n / 2, wpairs + padded * n / 2, 0u);
  with_rows(R, [&](auto r) {
    weighted_sum_dp<decltype(r)::value>(wpairs, v_cache, table, first, n / 2, last, h, kvH,
                                        DV, bs, padded, acc, ahead);
  });
}
#endif

}  // namespace
