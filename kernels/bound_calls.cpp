// The call runner: a run of bound kernel calls (bound_calls.py) in one call from Python.
// A decode step replays some 200 kernel calls (decode_program.py); made one by one through
// ctypes, each costs the interpreter's loop, the argument conversion and a return to Python,
// time in which only the main thread works and the memory bus the GEMVs stream from sits
// idle. Here the calls run back to back with the GIL released.
#include <cstdint>

extern "C" {

typedef int (*packed_kernel)(const int64_t* words);

// Call i is kernels[i](words + offsets[i]) (each kernel's `_packed` entry, packed_call.h).
// First, patch p writes values[sources[p]] into words[targets[p]]: the arguments that
// change per step (rotary tables, cache slots, block tables), set once in `values`.
// Returns 0, or i + 1 where call i returned nonzero (no call after it ran).
int64_t q_run_calls(const int64_t* kernels, const int64_t* offsets, int64_t n, int64_t* words,
                    const int64_t* targets, const int64_t* sources, int64_t patches,
                    const int64_t* values) {
  for (int64_t p = 0; p < patches; ++p) words[targets[p]] = values[sources[p]];
  for (int64_t i = 0; i < n; ++i) {
    const auto kernel = reinterpret_cast<packed_kernel>(static_cast<intptr_t>(kernels[i]));
    if (kernel(words + offsets[i]) != 0) return i + 1;
  }
  return 0;
}

}
