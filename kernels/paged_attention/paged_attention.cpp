// Attention over a paged KV cache, for CPUs, each sequence over its own cache blocks read in
// place (no gather into a padded batch): decode (one query token per sequence, below) and
// prefill (a prompt or prompt chunk per sequence, causal; further down).
//
// Built on first use by cpp_impl.py with the machine's C++ compiler (-O3 -march=native
// -fopenmp) and called through ctypes; no torch headers, so it compiles in about a second.
// The OpenMP runtime is the one torch already loaded (same soname), so torch's threads and
// these are one pool.
//
// Layouts of decode (all contiguous; prefill's are described at it):
//   q       [B, H, D]                 queries of the step, one per sequence (rows of q_stride
//                                     elements: a view of the fused q/k/v projection's output)
//   k_cache [blocks, kvH, D, bs]      one layer's keys, positions innermost
//   v_cache [blocks, kvH, bs, DV]     one layer's values (MLA: DV != D); a KV head's values
//                                     of a block are contiguous, as its keys are (vLLM's CPU
//                                     value cache is laid out the same way)
//   tables  [B, nblk] int64           each sequence's blocks, position p in block p / bs
//   lengths [B] int64                 keys a sequence's query sees: positions [0, len)
//   out     [B, H, DV] float32, or in the caches' dtype (OutT = T: what o_proj takes, rounded
//                                     as torch's .to() rounds)
// The H query heads share kvH key/value heads in groups of H / kvH (grouped-query
// attention); each (sequence, KV head) pair is one unit of work and reads its keys and
// values once for the whole group. Scores, softmax and the weighted sum run in fp32 (bf16
// caches on CPUs with AVX-512 BF16: bf16 products summed in fp32, the softmax weights
// rounded to bf16 for the weighted sum, as prefill and torch's flash attention do).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "attention_loops.h"
#include "../packed_call.h"

namespace {

// How far ahead of the weighted sum decode asks for values: a block (64 positions, 8 KB of
// a 64-wide bf16 head, contiguous; even, as weighted_sum_dp's paired prefetch needs). It
// came with the head-major value layout; the two together took 4-13% less time per layer
// than 32 positions and the old layout (docs/benchmarks.md, fourteenth session). The
// distance alone was chosen in a throwaway A/B whose script is not in the repo.
constexpr int64_t kValuesAhead = 64;

template <typename T, typename OutT>
void decode(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache,
            const int64_t* tables, const int64_t* lengths, OutT* out, int64_t B, int64_t H,
            int64_t kvH, int64_t D, int64_t DV, int64_t nblk, int64_t bs, int64_t window,
            float scale, float softcap, int threads) {
  const int64_t group = H / kvH;
  // query heads are scored R at a time (the group when it is at most 4, else 4): a larger
  // group is padded with zero queries to a multiple of 4, whose scores are dropped
  const int64_t rows = group > 4 ? 4 : group;
  const int64_t padded = (group + rows - 1) / rows * rows;
  // a thread takes all KV heads of a sequence in turn when there are sequences enough for
  // every thread: a block's heads lie side by side in memory, so the lines the first head
  // brings from memory (and their prefetched neighbours) serve the others from cache
  const int64_t chunk = B >= 2 * threads ? kvH : 1;
  // bf16 caches on AVX-512 take the register-held loops where the shapes allow; on AVX-512
  // BF16 prefill's vdpbf16ps pair loops instead (keys and values read as stored, half the
  // instructions): scores are then exact bf16 products summed in fp32 in another order, and
  // the softmax weights are rounded to bf16 for the weighted sum, as torch's flash attention
  // and the prefill kernel round them
  const bool vec = bs % 32 == 0 && DV % 64 == 0;
  bool pairs = false;
#if defined(__AVX512BF16__)
  pairs = std::is_same<T, uint16_t>::value && vec && D % 2 == 0;
#endif
  const float post = pairs ? scale : 1.f;  // the pair loops scale scores, not queries
#pragma omp parallel num_threads(threads)
  {
    // each thread's scratch, sized once for the longest sequence the tables allow
    std::vector<float> qf(padded * D, 0.f), part(padded * bs), scores(padded * nblk * bs),
        acc(padded * DV), total(group);
    std::vector<uint32_t> qpairs(pairs ? padded * D / 2 : 0, 0u),  // padded rows stay 0
        wpairs(pairs ? padded * nblk * bs / 2 : 0);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t unit = 0; unit < B * kvH; ++unit) {
      const int64_t b = unit / kvH, h = unit % kvH;
      const int64_t len = lengths[b];
      const int64_t first = (window > 0 && len > window) ? len - window : 0;
      // the pair loops start on an even position (one before a window's first, weighted 0)
      // and take whole pairs (a position past len - 1 is read as zeros)
      const int64_t from = pairs ? first & ~int64_t{1} : first;
      const int64_t n = pairs ? (len - from + 1) & ~int64_t{1} : len - from;
      OutT* o = out + (b * H + h * group) * DV;
      if (len <= first) {
        std::memset(o, 0, sizeof(OutT) * group * DV);
        continue;
      }
      for (int64_t j = 0; j < group; ++j) {
        const T* qj = q + b * q_stride + (h * group + j) * D;
        if (pairs) {
          std::memcpy(&qpairs[j * D / 2], qj, sizeof(T) * D);
        } else {
          load_row(qj, qf.data() + j * D, D);
          for (int64_t i = 0; i < D; ++i) qf[j * D + i] *= scale;
        }
      }
      const int64_t* table = tables + b * nblk;
      // decode reads the cache from memory (a step's model and cache outgrow the caches),
      // from blocks only the table locates. The pair loops ask for lines a fixed distance
      // ahead of their use (the next block's keys, the values 64 positions on), so here only
      // the first block's keys and values: asked for all at once, a unit's 80 KB (SmolLM2 at
      // 320 tokens) stalled the loads behind them (slower in a throwaway alternation, not
      // kept; bench_paged_attention.py times the result). The fp32 loops ask for every line
      // up front.
      if (pairs) {
        prefetch(head_block(k_cache, table[first / bs], kvH, h, D * bs), D * bs);
        for (int64_t p = from; p < std::min(len, from + 8); ++p)
          prefetch(value_row(v_cache, table, p, bs, kvH, h, DV), DV);
      } else {
        for (int64_t blk = first / bs; blk * bs < len; ++blk) {
          prefetch(head_block(k_cache, table[blk], kvH, h, D * bs), D * bs);
          prefetch(head_block(v_cache, table[blk], kvH, h, bs * DV), bs * DV);
        }
      }
      // scores, a block at a time: the block's keys for this head are [D][bs] (positions
      // innermost), so each query dimension is a broadcast multiply-add over 16 positions
      // (no horizontal sums), for R query heads at once (one key load feeds R
      // accumulators); positions outside [first, len) are computed and dropped
      for (int64_t blk = first / bs; blk * bs < len; ++blk) {
        const T* keys = head_block(k_cache, table[blk], kvH, h, D * bs);
        const int64_t lo = std::max(first, blk * bs) - blk * bs;
        const int64_t hi = std::min(len, (blk + 1) * bs) - blk * bs;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same<T, uint16_t>::value)
          if (pairs) {
            const T* next = (blk + 1) * bs < len
                                ? head_block(k_cache, table[blk + 1], kvH, h, D * bs)
                                : nullptr;
            with_rows(rows, [&](auto r) {
              block_scores_dp<decltype(r)::value>(qpairs.data(), keys, part.data(), padded, D,
                                                  bs, next);
            });
          }
#endif
        if (!pairs) score_block(rows, vec, qf.data(), keys, part.data(), padded, D, bs);
        for (int64_t j = 0; j < group; ++j)
          store_scores(part.data() + j * bs, scores.data() + j * n + blk * bs - from, lo, hi,
                       post, softcap);
      }
      for (int64_t j = 0; j < group; ++j)
        total[j] = softmax_weights(scores.data() + j * n, first - from, len - from, n);
#if defined(__AVX512BF16__)
      if constexpr (std::is_same<T, uint16_t>::value)
        if (pairs)
          weighted_sum_pairs(rows, scores.data(), group, padded, n, wpairs.data(), v_cache,
                             table, from, len - 1, h, kvH, DV, bs, acc.data(), kValuesAhead);
#endif
      if (!pairs)
        sum_values(rows, vec, scores.data(), v_cache, table, first, n, h, kvH, DV, bs, padded,
                   acc.data());
      for (int64_t j = 0; j < group; ++j)
        for (int64_t i = 0; i < DV; ++i) store(o + j * DV + i, acc[j * DV + i] / total[j]);
    }
  }
}

// Causal attention of a step's query tokens over their sequences' cache blocks: prompts, and
// chunks of prompts that continue earlier ones (their own keys are in the cache already).
// Sequence b's spans[b] = (first row in q, query count, position of its first query); query
// i is at position pos = spans[b][2] + i and sees the keys at [max(0, pos - window + 1), pos].
// A unit of work is (sequence, KV head, tile of up to `tile` positions); its rows are the
// tile's positions x the group's query heads, scored R at a time, softmax over each row's
// visible keys, masked keys weighted 0. A row's sums run in the same order whatever tile or
// step it is in, so a prompt's outputs do not depend on what else the step carries. bf16
// caches on CPUs with AVX-512 BF16 take the dot-product loops (attention_loops.h), others the
// decode loops (fp32 multiply-adds).
constexpr int64_t kTileRows = 64;            // rows per unit: positions x group
constexpr int64_t kScoreBytes = 256 * 1024;  // a unit's fp32 scores, to stay in L2

struct Unit {
  int64_t b, h, first, count;  // sequence, KV head, first query of the tile, queries
};

// a unit's query positions [pos0, last] see keys from `first` (even on the pair path)
inline int64_t keys_from(int64_t pos0, int64_t window, bool pairs) {
  const int64_t first = window > 0 ? std::max<int64_t>(0, pos0 - window + 1) : 0;
  return pairs ? first & ~int64_t{1} : first;
}

template <typename T>
void prefill(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache,
             const int64_t* tables, const int64_t* spans, T* out, int64_t out_stride,
             int64_t B, int64_t H, int64_t kvH, int64_t D, int64_t DV, int64_t nblk,
             int64_t bs, int64_t window, float scale, float softcap, int threads) {
  const int64_t group = H / kvH;
  const bool vec = bs % 32 == 0 && DV % 64 == 0;
  bool pairs = false;
#if defined(__AVX512BF16__)
  pairs = std::is_same<T, uint16_t>::value && vec && D % 2 == 0;
#endif
  std::vector<Unit> units;
  int64_t max_rows = 1, max_keys = 2;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t count = spans[3 * b + 1], pos0 = spans[3 * b + 2];
    if (count <= 0) continue;
    const int64_t seen = window > 0 ? std::min(pos0 + count, window + kTileRows) : pos0 + count;
    int64_t tile = std::max<int64_t>(1, kTileRows / group);
    while (tile > 1 && tile * group * seen * 4 > kScoreBytes) tile /= 2;
    // the last tiles see the most keys: queued first, so that threads finish together
    for (int64_t i0 = (count - 1) / tile * tile; i0 >= 0; i0 -= tile)
      for (int64_t h = 0; h < kvH; ++h) {
        const int64_t n = std::min(count - i0, tile);
        units.push_back({b, h, i0, n});
        max_rows = std::max(max_rows, n * group);
        max_keys = std::max(max_keys, pos0 + i0 + n + 1 - keys_from(pos0 + i0, window, pairs));
      }
  }
  const int64_t max_padded = (max_rows + 3) / 4 * 4;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qf(max_padded * D), part(max_padded * bs),
        scores(max_padded * max_keys), acc(max_padded * DV), total(max_padded);
    std::vector<uint32_t> qpairs(pairs ? max_padded * D / 2 : 0),
        wpairs(pairs ? max_padded * max_keys / 2 : 0);
#pragma omp for schedule(dynamic, 1)
    for (size_t k = 0; k < units.size(); ++k) {
      const Unit u = units[k];
      const int64_t row0 = spans[3 * u.b] + u.first, pos0 = spans[3 * u.b + 2] + u.first;
      const int64_t h = u.h, rows = u.count * group;
      const int64_t R = rows > 4 ? 4 : rows, padded = (rows + R - 1) / R * R;
      const int64_t last = pos0 + u.count - 1;
      const int64_t first = keys_from(pos0, window, pairs);
      int64_t n = last + 1 - first;
      if (pairs) n += n % 2;  // whole pairs; a position past `last` is weighted 0
      const int64_t* table = tables + u.b * nblk;
      // rows position-major: row r is position pos0 + r / group, head h * group + r % group
      auto q_row = [&](int64_t r) {
        return q + (row0 + r / group) * q_stride + (h * group + r % group) * D;
      };
      if (pairs) {  // the pair loops take q as stored and scale the scores
        for (int64_t r = 0; r < rows; ++r) std::memcpy(&qpairs[r * D / 2], q_row(r), 2 * D);
        std::fill(qpairs.begin() + rows * D / 2, qpairs.begin() + padded * D / 2, 0u);
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          load_row(q_row(r), qf.data() + r * D, D);
          for (int64_t i = 0; i < D; ++i) qf[r * D + i] *= scale;
        }
        std::fill(qf.begin() + rows * D, qf.begin() + padded * D, 0.f);
      }
      const float post = pairs ? scale : 1.f;
      for (int64_t blk = first / bs; blk * bs <= last; ++blk) {
        const T* keys = head_block(k_cache, table[blk], kvH, h, D * bs);
        const int64_t lo = std::max(first, blk * bs) - blk * bs;
        const int64_t hi = std::min(last + 1, (blk + 1) * bs) - blk * bs;
#if defined(__AVX512BF16__)
        if constexpr (std::is_same<T, uint16_t>::value)
          if (pairs)
            with_rows(R, [&](auto r) {
              block_scores_dp<decltype(r)::value>(qpairs.data(), keys, part.data(), padded, D,
                                                  bs);
            });
#endif
        if (!pairs) score_block(R, vec, qf.data(), keys, part.data(), padded, D, bs);
        for (int64_t r = 0; r < rows; ++r)
          store_scores(part.data() + r * bs, scores.data() + r * n + blk * bs - first, lo, hi,
                       post, softcap);
      }
      for (int64_t r = 0; r < rows; ++r) {  // row r sees the keys [seen_from, pos]
        const int64_t pos = pos0 + r / group;
        const int64_t seen_from = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
        total[r] = softmax_weights(scores.data() + r * n, seen_from - first, pos + 1 - first, n);
      }
      // padded rows weigh nothing (the fp32 loops read their weights too)
      std::fill(scores.begin() + rows * n, scores.begin() + padded * n, 0.f);
#if defined(__AVX512BF16__)
      if constexpr (std::is_same<T, uint16_t>::value)
        if (pairs)
          weighted_sum_pairs(R, scores.data(), rows, padded, n, wpairs.data(), v_cache, table,
                             first, last, h, kvH, DV, bs, acc.data());
#endif
      if (!pairs)
        sum_values(R, vec, scores.data(), v_cache, table, first, n, h, kvH, DV, bs, padded,
                   acc.data());
      for (int64_t r = 0; r < rows; ++r) {
        T* o = out + (row0 + r / group) * out_stride + (h * group + r % group) * DV;
        const float inv = 1.f / total[r];
        for (int64_t i = 0; i < DV; ++i) store(o + i, acc[r * DV + i] * inv);
      }
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16 (q and both caches share it); q rows q_stride elements
// apart; out_in_cache_dtype: 0 = out is float32, 1 = in the caches' dtype. Returns 0.
int q_paged_decode(int dtype, const void* q, int64_t q_stride, const void* k_cache,
                   const void* v_cache, const int64_t* tables, const int64_t* lengths, void* out,
                   int out_in_cache_dtype, int64_t B, int64_t H, int64_t kvH, int64_t D,
                   int64_t DV, int64_t nblk, int64_t bs, int64_t window, float scale,
                   float softcap, int threads) {
  const auto run = [&](auto q, auto k, auto v, auto o) {
    decode(q, q_stride, k, v, tables, lengths, o, B, H, kvH, D, DV, nblk, bs, window, scale,
           softcap, threads);
  };
  if (dtype == 1) {
    const auto* q16 = static_cast<const uint16_t*>(q);
    const auto* k16 = static_cast<const uint16_t*>(k_cache);
    const auto* v16 = static_cast<const uint16_t*>(v_cache);
    if (out_in_cache_dtype)
      run(q16, k16, v16, static_cast<uint16_t*>(out));
    else
      run(q16, k16, v16, static_cast<float*>(out));
  } else {
    run(static_cast<const float*>(q), static_cast<const float*>(k_cache),
        static_cast<const float*>(v_cache), static_cast<float*>(out));
  }
  return 0;
}


// Causal prefill (see prefill above): q rows of q_stride elements, out rows of out_stride, in
// the caches' dtype. Returns 0.
int q_paged_prefill(int dtype, const void* q, int64_t q_stride, const void* k_cache,
                    const void* v_cache, const int64_t* tables, const int64_t* spans, void* out,
                    int64_t out_stride, int64_t B, int64_t H, int64_t kvH, int64_t D,
                    int64_t DV, int64_t nblk, int64_t bs, int64_t window, float scale,
                    float softcap, int threads) {
  if (dtype == 1)
    prefill(static_cast<const uint16_t*>(q), q_stride, static_cast<const uint16_t*>(k_cache),
            static_cast<const uint16_t*>(v_cache), tables, spans, static_cast<uint16_t*>(out),
            out_stride, B, H, kvH, D, DV, nblk, bs, window, scale, softcap, threads);
  else
    prefill(static_cast<const float*>(q), q_stride, static_cast<const float*>(k_cache),
            static_cast<const float*>(v_cache), tables, spans, static_cast<float*>(out),
            out_stride, B, H, kvH, D, DV, nblk, bs, window, scale, softcap, threads);
  return 0;
}

}

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_paged_decode)
