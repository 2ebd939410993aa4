// Decode attention over a paged KV cache, for CPUs: one query token per sequence attends
// over its own cache blocks, read in place (no gather into a padded batch).
//
// Built on first use by cpp_impl.py with the machine's C++ compiler (-O3 -march=native
// -fopenmp) and called through ctypes; no torch headers, so it compiles in about a second.
// The OpenMP runtime is the one torch already loaded (same soname), so torch's threads and
// these are one pool.
//
// Layouts (all contiguous):
//   q       [B, H, D]                 queries of the step, one per sequence
//   k_cache [blocks, kvH, D, bs]      one layer's keys, positions innermost
//   v_cache [blocks, bs, kvH, DV]     one layer's values (MLA: DV != D)
//   tables  [B, nblk] int64           each sequence's blocks, position p in block p / bs
//   lengths [B] int64                 keys a sequence's query sees: positions [0, len)
//   out     [B, H, DV] float32
// The H query heads share kvH key/value heads in groups of H / kvH (grouped-query
// attention); each (sequence, KV head) pair is one unit of work and reads its keys and
// values once for the whole group. Scores, softmax and the weighted sum run in fp32.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

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
inline float to_float(uint16_t x) {  // bf16: the high half of an fp32
  return bits_to_float(static_cast<uint32_t>(x) << 16);
}

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
      const T* rows = v_cache + (table[blk] * bs * kvH + h) * DV;
      for (int64_t d0 = 0; d0 < DV; d0 += CHUNK) {  // accumulators stay in registers
        const int64_t width = std::min(CHUNK, DV - d0);
        float part[R][CHUNK] = {};
        float v[CHUNK] = {};
        for (int64_t p = lo; p < hi; ++p) {
          const T* src = rows + (p - blk * bs) * kvH * DV + d0;
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
// 16 bf16 -> 16 fp32: widen, shift up.
inline __m512 widen16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

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
        const uint16_t* rows = v_cache + (table[blk] * bs * kvH + h) * DV + d0;
        for (int64_t p = lo; p < hi; ++p) {
          const uint16_t* src = rows + (p - blk * bs) * kvH * DV;
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

template <typename T>
void decode(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
            const int64_t* lengths, float* out, int64_t B, int64_t H, int64_t kvH, int64_t D,
            int64_t DV, int64_t nblk, int64_t bs, int64_t window, float scale, float softcap,
            int threads) {
  const int64_t group = H / kvH;
  // query heads are scored R at a time (the group when it is at most 4, else 4): a larger
  // group is padded with zero queries to a multiple of 4, whose scores are dropped
  const int64_t rows = group > 4 ? 4 : group;
  const int64_t padded = (group + rows - 1) / rows * rows;
  // a thread takes all KV heads of a sequence in turn when there are sequences enough for
  // every thread: the heads' keys and values interleave in memory, so the lines the first
  // head brings from memory (and their prefetched neighbours) serve the others from cache
  const int64_t chunk = B >= 2 * threads ? kvH : 1;
  // bf16 caches on AVX-512 take the register-held loops where the shapes allow
  [[maybe_unused]] const bool vec = bs % 32 == 0 && DV % 64 == 0;
#pragma omp parallel num_threads(threads)
  {
    // each thread's scratch, sized once for the longest sequence the tables allow
    std::vector<float> qf(padded * D, 0.f), part(padded * bs), scores(padded * nblk * bs),
        acc(padded * DV), peak(group), total(group);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t unit = 0; unit < B * kvH; ++unit) {
      const int64_t b = unit / kvH, h = unit % kvH;
      const int64_t len = lengths[b];
      const int64_t first = (window > 0 && len > window) ? len - window : 0;
      const int64_t n = len - first;
      float* o = out + (b * H + h * group) * DV;
      if (n <= 0) {
        std::memset(o, 0, sizeof(float) * group * DV);
        continue;
      }
      for (int64_t j = 0; j < group; ++j) {
        load_row(q + (b * H + h * group + j) * D, qf.data() + j * D, D);
        for (int64_t i = 0; i < D; ++i) qf[j * D + i] *= scale;
        peak[j] = -INFINITY;
      }
      const int64_t* table = tables + b * nblk;
      // every line this unit reads, asked for at once: decode reads the cache from memory
      // (a step's model and cache outgrow the caches), from blocks only the table locates
      for (int64_t blk = first / bs; blk * bs < len; ++blk) {
        prefetch(k_cache + (table[blk] * kvH + h) * D * bs, D * bs);
        for (int64_t p = 0; p < bs; ++p)
          prefetch(v_cache + ((table[blk] * bs + p) * kvH + h) * DV, DV);
      }
      // scores, a block at a time: the block's keys for this head are [D][bs] (positions
      // innermost), so each query dimension is a broadcast multiply-add over 16 positions
      // (no horizontal sums), for R query heads at once (one key load feeds R
      // accumulators); positions outside [first, len) are computed and dropped
      for (int64_t blk = first / bs; blk * bs < len; ++blk) {
        const T* keys = k_cache + (table[blk] * kvH + h) * D * bs;
        const int64_t lo = std::max(first, blk * bs) - blk * bs;
        const int64_t hi = std::min(len, (blk + 1) * bs) - blk * bs;
        with_rows(rows, [&](auto r) {
          constexpr int R = decltype(r)::value;
#if defined(__AVX512F__)
          if constexpr (std::is_same<T, uint16_t>::value)
            if (vec) return block_scores_bf16<R>(qf.data(), keys, part.data(), padded, D, bs);
#endif
          block_scores<R>(qf.data(), keys, part.data(), padded, D, bs);
        });
        for (int64_t j = 0; j < group; ++j) {
          float* sj = scores.data() + j * n + blk * bs - first;
          const float* pj = part.data() + j * bs;
          float top = peak[j];
          if (softcap > 0.f) {
            for (int64_t t = lo; t < hi; ++t) {
              const float s = std::tanh(pj[t] / softcap) * softcap;
              sj[t] = s;
              top = s > top ? s : top;
            }
          } else {
#pragma omp simd reduction(max : top)
            for (int64_t t = lo; t < hi; ++t) {
              sj[t] = pj[t];
              top = pj[t] > top ? pj[t] : top;
            }
          }
          peak[j] = top;
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* sj = scores.data() + j * n;
        const float top = peak[j];
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < n; ++t) {
          sj[t] = exp_nonpositive(sj[t] - top);
          sum += sj[t];
        }
        total[j] = sum;
      }
      with_rows(rows, [&](auto r) {
        constexpr int R = decltype(r)::value;
#if defined(__AVX512F__)
        if constexpr (std::is_same<T, uint16_t>::value)
          if (vec)
            return weighted_sum_bf16<R>(scores.data(), v_cache, table, first, n, h, kvH, DV,
                                        bs, padded, acc.data());
#endif
        weighted_sum<R>(scores.data(), v_cache, table, first, n, h, kvH, DV, bs, padded,
                        acc.data());
      });
      for (int64_t j = 0; j < group; ++j)
        for (int64_t i = 0; i < DV; ++i) o[j * DV + i] = acc[j * DV + i] / total[j];
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16 (q and both caches share it). Returns 0.
int q_paged_decode(int dtype, const void* q, const void* k_cache, const void* v_cache,
                   const int64_t* tables, const int64_t* lengths, float* out, int64_t B,
                   int64_t H, int64_t kvH, int64_t D, int64_t DV, int64_t nblk, int64_t bs,
                   int64_t window, float scale, float softcap, int threads) {
  if (dtype == 1)
    decode(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache),
           static_cast<const uint16_t*>(v_cache), tables, lengths, out, B, H, kvH, D, DV,
           nblk, bs, window, scale, softcap, threads);
  else
    decode(static_cast<const float*>(q), static_cast<const float*>(k_cache),
           static_cast<const float*>(v_cache), tables, lengths, out, B, H, kvH, D, DV, nblk,
           bs, window, scale, softcap, threads);
  return 0;
}

}
