// A kernel's entry point called from an array of 64-bit words, for the call runner
// (bound_calls.cpp): Q_PACKED(q_fn) defines `int q_fn_packed(const int64_t* words)`, which
// calls q_fn with word i converted to the type of its parameter i (pointers and integers
// from their value, a float from the low 32 bits of its word). The runner can then call any
// kernel through one signature, without knowing its parameters; bound_calls.py writes the
// words from the argument types ctypes was given (cpp_build.bind), so both sides follow the
// one declaration per kernel.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace q_packed {

template <typename T>
inline T from_word(int64_t word) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(static_cast<intptr_t>(word));
  } else if constexpr (std::is_same_v<T, float>) {
    const auto bits = static_cast<uint32_t>(word);
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  } else {
    static_assert(std::is_integral_v<T>, "kernels take pointers, integers and floats");
    return static_cast<T>(word);
  }
}

template <typename... A, std::size_t... I>
inline int call(int (*fn)(A...), const int64_t* words, std::index_sequence<I...>) {
  return fn(from_word<A>(words[I])...);
}

template <typename... A>
inline int call(int (*fn)(A...), const int64_t* words) {
  return call(fn, words, std::index_sequence_for<A...>{});
}

}  // namespace q_packed

#define Q_PACKED(name)                                  \
  extern "C" int name##_packed(const int64_t* words) { \
    return q_packed::call(name, words);                 \
  }
