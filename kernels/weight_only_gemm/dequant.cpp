// Weight-only int4 and int8 weights -> a bf16 matrix, in one pass each.
//
// For prompts (M above the packed kernel's crossover) the weight-only GEMM dequantizes the
// weight for the call and runs bf16 GEMM. In torch ops that is six passes over the matrix
// (unpack, permute, convert, subtract 8, scale, add the zero); here it is one, built on
// first use by q.kernels.cpp_build and called through ctypes. int8 (q_dequant_int8) is the
// same idea: two torch passes (convert, scale; three with zero points) become one.
//
// Layout (torch 2.13, checked by torch_impl.int4pack_block_n on the running build): [N, K]
// stored as [N / B, K, B / 2] bytes; byte (b, k, j) holds row b*B + j in its low nibble and
// row b*B + B/2 + j in its high nibble, as unsigned q in 0..15. scales_and_zeros is bf16
// [K / group, N, 2]: w = (q - 8) * s + z. The arithmetic and its roundings are those of
// the torch path it replaces (bf16 products, then bf16 sums, round to nearest even), so
// the two give the same bits.
#include <cstdint>
#include <cstring>

#include "../bf16.h"

namespace {

using q_bf16::from_bf16;
using q_bf16::to_bf16;

inline uint16_t dequant(int q, float s, float z) {
  const float scaled = from_bf16(to_bf16(static_cast<float>(q - 8) * s));
  return to_bf16(scaled + z);
}

}  // namespace

extern "C" {

// out: bf16 [N, K]. group divides K and is a multiple of TILE; B is even and divides N.
int q_dequant_int4pack(const uint8_t* packed, const uint16_t* scales_and_zeros,
                       uint16_t* out, int64_t N, int64_t K, int64_t B, int64_t group,
                       int threads) {
  constexpr int64_t TILE = 32;  // columns per pass: writes stay contiguous along each row
  const int64_t half = B / 2;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int64_t b = 0; b < N / B; ++b) {
    for (int64_t k0 = 0; k0 < K; k0 += TILE) {
      const int64_t width = K - k0 < TILE ? K - k0 : TILE;
      const uint16_t* sz = scales_and_zeros + ((k0 / group) * N + b * B) * 2;
      for (int64_t j = 0; j < half; ++j) {
        const float s_lo = from_bf16(sz[2 * j]), z_lo = from_bf16(sz[2 * j + 1]);
        const float s_hi = from_bf16(sz[2 * (j + half)]);
        const float z_hi = from_bf16(sz[2 * (j + half) + 1]);
        uint16_t* lo = out + (b * B + j) * K + k0;
        uint16_t* hi = out + (b * B + half + j) * K + k0;
        const uint8_t* src = packed + (b * K + k0) * half + j;
#pragma omp simd
        for (int64_t kk = 0; kk < width; ++kk) {
          const uint8_t byte = src[kk * half];
          lo[kk] = dequant(byte & 0xF, s_lo, z_lo);
          hi[kk] = dequant(byte >> 4, s_hi, z_hi);
        }
      }
    }
  }
  return 0;
}

// int8 codes [N, K] -> bf16 [N, K]: w = bf16(bf16(code - zero) * scale), the roundings of
// torch's ``codes.to(bf16).sub_(zero).mul_(scale)`` (zero and scale bf16, per row and group
// of `group` columns: [N, K / group]; zero may be null).
int q_dequant_int8(const int8_t* codes, const uint16_t* scale, const uint16_t* zero,
                   uint16_t* out, int64_t N, int64_t K, int64_t group, int threads) {
  const int64_t groups = (K + group - 1) / group;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* c = codes + n * K;
    uint16_t* o = out + n * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = from_bf16(scale[n * groups + g]);
      const float z = zero == nullptr ? 0.f : from_bf16(zero[n * groups + g]);
      const int64_t end = (g + 1) * group < K ? (g + 1) * group : K;
#pragma omp simd
      for (int64_t k = g * group; k < end; ++k) {
        const float shifted = from_bf16(to_bf16(static_cast<float>(c[k]) - z));
        o[k] = to_bf16(shifted * s);
      }
    }
  }
  return 0;
}

}
