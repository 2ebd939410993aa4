// bf16 <-> fp32 for one value, the rule every q C++ kernel rounds its bf16 outputs by: round
// to nearest even (c10::BFloat16's, so a kernel's bf16 numbers are the ones torch's ops
// would store), with NaN kept a quiet NaN. Branch-free, and the bit casts go through a union
// (a GCC extension): GCC vectorizes loops that call these, not those with memcpy or
// std::bit_cast in them (decoder_ops.cpp's norms and paged attention's stores rely on it).
// Included by the kernels' sources; q.kernels.cpp_build hashes it with each of them.
#pragma once

#include <cstdint>

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

}  // namespace q_bf16
