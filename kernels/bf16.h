// bf16 <-> fp32 for one value, the rule every q C++ kernel rounds its bf16 outputs by: round
// to nearest even (c10::BFloat16's, so a kernel's bf16 numbers are the ones torch's ops
// would store), with NaN kept a quiet NaN. Branch-free, and the bit casts go through a union
// (a GCC extension): GCC vectorizes loops that call these, not those with memcpy or
// std::bit_cast in them (decoder_ops.cpp's norms and paged attention's stores rely on it).
// Included by the kernels' sources; q.kernels.cpp_build hashes it with each of them.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace q_bf16 {

inline float from_bf16(uint16_t h) {  // exact
  union { uint32_t u; float f; } c;
  c.u = static_cast<uint32_t>(h) << 16;
  return c.f;
}

inline uint16_t to_bf16(float v) {
  union { uint32_t u; float f; } c;
  c.f = v;
  const uint32_t u = c.u;
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

#if defined(__AVX512F__)
// The same two rules on 16 lanes, for kernels whose bf16 outputs must be torch's bits
// (AVX-512 BF16's vcvtneps2bf16, which the GEMMs use, treats denormals as zero and keeps
// NaN payloads, by Intel's definition).
inline __m512 widen16(const uint16_t* p) {  // 16 bf16 -> 16 fp32: widen, shift up
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline void store_bf16x16(uint16_t* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)),
                       _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))),
      16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                                  _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
}
#endif

}  // namespace q_bf16
