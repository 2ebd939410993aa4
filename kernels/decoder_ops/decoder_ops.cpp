// The elementwise work of a Llama-style decoder layer, for CPUs, each op in one pass:
//   q_rms_norm     (residual add +) RMSNorm, as transformers' LlamaRMSNorm computes it
//   q_rotary_cache rotary embedding of q and k in place, and k, v written to the paged cache
//   q_silu_mul     SiLU(gate) x up in bf16, SiLU looked up in a table of torch's own SiLU
// transformers runs these as about 20 small torch ops per layer; at decode sizes each op's
// fixed cost outweighs its arithmetic (tests/bench/profile_engine_cpu.py). A SiLU computed
// here with its own exp was slower than torch's (Sleef's, vectorized) and could not match
// its bits; a bf16 input has only 65536 values, so the caller passes torch's SiLU of every
// one of them (a 256 KB fp32 table, built once) and this file only looks it up: torch's
// numbers by construction, one pass over gate and up instead of torch's two.
//
// Every rounding is where torch rounds: in bf16 each op of the reference rounds its result to
// bf16 (round to nearest even), and here too; so the rotary embedding and the residual add are
// bit-exact; RMSNorm adds its squares in torch's order (sum_squares), so it is bit-exact
// where that order is known (x86 builds of torch; tests check it).
// No fused multiply-adds: a * b + c * d must round both products, as torch does.
#pragma GCC optimize("fp-contract=off")
#pragma STDC FP_CONTRACT OFF
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../bf16.h"
#include "../packed_call.h"

namespace {

using q_bf16::to_bf16;  // c10::BFloat16's rounding

inline float load(float x) { return x; }
inline float load(uint16_t x) { return q_bf16::from_bf16(x); }

inline void store(float* p, float x) { *p = x; }
inline void store(uint16_t* p, float x) { *p = to_bf16(x); }
// the value an op of the reference leaves: x rounded to the tensor's dtype
inline float round_to(float, float x) { return x; }
inline float round_to(uint16_t, float x) { return load(to_bf16(x)); }

// rows are split across threads only when there is enough work: an OpenMP team costs a few
// microseconds, more than a decode token's whole norm
constexpr int64_t PARALLEL_ELEMENTS = 1 << 15;

// The sum of squares of a row in the order torch's CPU sum adds them (ATen's cascade_sum for
// a contiguous inner reduction): Vectorized<float> lanes of W floats; whole vectors in
// groups of 4 (ILP), each of the 4 streams summed in chunks of 16 groups whose partial sums
// cascade up to 4 levels; then the 4 streams, the leftover vectors, the scalar tail and the
// W lanes one after another. Adding in the same order makes RMSNorm bit-exact to
// transformers'; W is the lane count of the sum kernel torch runs here (cpp_impl probes it).
template <int W, typename T>
float sum_squares(const T* x, int64_t n) {
  constexpr int ILP = 4, LEVELS = 4;
  if (n < W) {  // rows shorter than a vector: torch sums scalars in 4 streams
    float s[ILP] = {};
    const int64_t groups = n / ILP;
    for (int64_t g = 0; g < groups; ++g)
      for (int k = 0; k < ILP; ++k) s[k] += load(x[g * ILP + k]) * load(x[g * ILP + k]);
    for (int64_t i = groups * ILP; i < n; ++i) s[0] += load(x[i]) * load(x[i]);
    return ((s[0] + s[1]) + s[2]) + s[3];
  }
  const int64_t vectors = n / W, groups = vectors / ILP;
  int64_t log2 = 1;  // ATen's CeilLog2
  if (groups > 2) log2 = 64 - __builtin_clzll(static_cast<uint64_t>(groups - 1));
  const int64_t power = std::max<int64_t>(4, log2 / LEVELS), step = int64_t(1) << power;
  const int64_t mask = step - 1;
  float acc[LEVELS][ILP][W] = {};
  auto add_group = [&](int64_t g, float* sums) {  // sums[k][l] += x[(g*ILP + k)*W + l]^2
    for (int k = 0; k < ILP; ++k) {
      const T* v = x + (g * ILP + k) * W;
      float* a = sums + k * W;
#pragma omp simd
      for (int l = 0; l < W; ++l) {
        const float f = load(v[l]);
        a[l] += f * f;
      }
    }
  };
  int64_t g = 0;
  while (g + step <= groups) {
    for (int64_t j = 0; j < step; ++j, ++g) add_group(g, &acc[0][0][0]);
    for (int lvl = 1; lvl < LEVELS; ++lvl) {
      for (int k = 0; k < ILP; ++k)
        for (int l = 0; l < W; ++l) {
          acc[lvl][k][l] += acc[lvl - 1][k][l];
          acc[lvl - 1][k][l] = 0.f;
        }
      if (g & (mask << (lvl * power))) break;
    }
  }
  for (; g < groups; ++g) add_group(g, &acc[0][0][0]);
  for (int lvl = 1; lvl < LEVELS; ++lvl)
    for (int k = 0; k < ILP; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[lvl][k][l];
  for (int64_t v = groups * ILP; v < vectors; ++v)  // leftover whole vectors: stream 0
    for (int l = 0; l < W; ++l) {
      const float f = load(x[v * W + l]);
      acc[0][0][l] += f * f;
    }
  for (int k = 1; k < ILP; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.f;
  for (int64_t i = vectors * W; i < n; ++i) total += load(x[i]) * load(x[i]);
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

template <typename T>
float sum_squares(const T* x, int64_t n, int lanes) {
  return lanes == 16 ? sum_squares<16>(x, n) : sum_squares<8>(x, n);
}

template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* residual, int64_t r_stride,
              const T* weight, T* out, T* sum_out, int64_t rows, int64_t n, float eps,
              int lanes, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * n >= PARALLEL_ELEMENTS)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * x_stride;
    T* o = out + r * n;
    if (residual) {  // s = residual + x, rounded as torch's add rounds
      const T* rr = residual + r * r_stride;
      T* s = sum_out + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(s + i, load(rr[i]) + load(xr[i]));
      xr = s;
    }
    const float variance = sum_squares(xr, n, lanes) / static_cast<float>(n);
    const float inv = 1.f / std::sqrt(variance + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float normed = round_to(T(), load(xr[i]) * inv);  // .to(input_dtype)
      store(o + i, load(weight[i]) * normed);
    }
  }
}

// q [N, H*D] and k [N, kvH*D] (row strides given) rotated in place: the first and second
// halves of each head, x1 and x2, become x1 cos - x2 sin and x2 cos + x1 sin (transformers'
// rotate_half convention, cos/sin [N, D] with both halves equal); then each token's k and v
// go to its slot of the cache: keys [blocks, kvH, D, bs], values [blocks, kvH, bs, DV]
template <typename T>
void rotate_heads(T* x, int64_t heads, int64_t D, const T* c, const T* s) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* v = x + h * D;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float a = load(v[i]), b = load(v[i + half]);
      // each product rounded, then the sum: q * cos + rotate_half(q) * sin
      const float lo = round_to(T(), a * load(c[i])) + round_to(T(), -b * load(s[i]));
      const float hi = round_to(T(), b * load(c[i + half])) + round_to(T(), a * load(s[i + half]));
      store(v + i, lo);
      store(v + i + half, hi);
    }
  }
}

template <typename T>
void rotary_cache(T* q, int64_t q_stride, int64_t H, T* k, int64_t k_stride, const T* v,
                  int64_t v_stride, int64_t kvH, int64_t D, int64_t DV, const T* cos,
                  const T* sin, int64_t rows, T* k_cache, T* v_cache, const int64_t* slots,
                  int64_t bs, int threads) {
#pragma omp parallel for num_threads(threads) if (rows * (H + kvH) * D >= PARALLEL_ELEMENTS)
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = cos + r * D;
    const T* s = sin + r * D;
    rotate_heads(q + r * q_stride, H, D, c, s);
    T* kr = k + r * k_stride;
    rotate_heads(kr, kvH, D, c, s);
    if (!k_cache) continue;
    const int64_t block = slots[r] / bs, offset = slots[r] % bs;
    for (int64_t h = 0; h < kvH; ++h) {
      T* dst = k_cache + ((block * kvH + h) * D) * bs + offset;
      for (int64_t i = 0; i < D; ++i) dst[i * bs] = kr[h * D + i];
    }
    for (int64_t h = 0; h < kvH; ++h)
      std::memcpy(v_cache + ((block * kvH + h) * bs + offset) * DV, v + r * v_stride + h * DV,
                  sizeof(T) * DV);
  }
}

// out = SiLU(gate) x up, each product rounded to bf16 as torch's mul rounds it; gate and up
// rows of in_stride elements (the two halves of one fused gate/up output), table[bits] the
// fp32 value of torch's bf16 SiLU of the bf16 number with those bits
void silu_mul_row(const uint16_t* gate, const uint16_t* up, const float* table, uint16_t* out,
                  int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512i bits = _mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gate + i)));
    const __m512 silu = _mm512_i32gather_ps(bits, table, 4);
    q_bf16::store_bf16x16(out + i, _mm512_mul_ps(silu, q_bf16::widen16(up + i)));
  }
#endif
  for (; i < n; ++i) out[i] = to_bf16(table[gate[i]] * load(up[i]));
}

}  // namespace

// dtype: 0 = float32, 1 = bfloat16 (every tensor of a call shares it). Return 0.
extern "C" {

int q_rms_norm(int dtype, const void* x, int64_t x_stride, const void* residual,
               int64_t r_stride, const void* weight, void* out, void* sum_out, int64_t rows,
               int64_t n, float eps, int lanes, int threads) {
  if (dtype == 1)
    rms_norm(static_cast<const uint16_t*>(x), x_stride, static_cast<const uint16_t*>(residual),
             r_stride, static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out),
             static_cast<uint16_t*>(sum_out), rows, n, eps, lanes, threads);
  else
    rms_norm(static_cast<const float*>(x), x_stride, static_cast<const float*>(residual),
             r_stride, static_cast<const float*>(weight), static_cast<float*>(out),
             static_cast<float*>(sum_out), rows, n, eps, lanes, threads);
  return 0;
}

int q_rotary_cache(int dtype, void* q, int64_t q_stride, int64_t H, void* k, int64_t k_stride,
                   const void* v, int64_t v_stride, int64_t kvH, int64_t D, int64_t DV,
                   const void* cos, const void* sin, int64_t rows, void* k_cache,
                   void* v_cache, const int64_t* slots, int64_t bs, int threads) {
  if (dtype == 1)
    rotary_cache(static_cast<uint16_t*>(q), q_stride, H, static_cast<uint16_t*>(k), k_stride,
                 static_cast<const uint16_t*>(v), v_stride, kvH, D, DV,
                 static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin), rows,
                 static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache), slots, bs,
                 threads);
  else
    rotary_cache(static_cast<float*>(q), q_stride, H, static_cast<float*>(k), k_stride,
                 static_cast<const float*>(v), v_stride, kvH, D, DV,
                 static_cast<const float*>(cos), static_cast<const float*>(sin), rows,
                 static_cast<float*>(k_cache), static_cast<float*>(v_cache), slots, bs,
                 threads);
  return 0;
}

// bf16 only (the table is of bf16 inputs)
int q_silu_mul(const void* gate, const void* up, int64_t in_stride, const float* table,
               void* out, int64_t out_stride, int64_t rows, int64_t n, int threads) {
  const auto* g = static_cast<const uint16_t*>(gate);
  const auto* u = static_cast<const uint16_t*>(up);
  auto* o = static_cast<uint16_t*>(out);
#pragma omp parallel for num_threads(threads) if (rows * n >= PARALLEL_ELEMENTS)
  for (int64_t r = 0; r < rows; ++r)
    silu_mul_row(g + r * in_stride, u + r * in_stride, table, o + r * out_stride, n);
  return 0;
}

}

// entries for the call runner (bound_calls.cpp)
Q_PACKED(q_rms_norm)
Q_PACKED(q_rotary_cache)
Q_PACKED(q_silu_mul)
