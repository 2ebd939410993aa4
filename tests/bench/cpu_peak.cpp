// The arithmetic peak of this CPU's bf16 dot-product instruction (AVX-512 BF16 vdpbf16ps on
// 512-bit registers), with no memory traffic: 12 independent accumulators per thread, so the
// loop is bound by the instruction's throughput, not its latency. What the strip kernels'
// prefill GEMMs are compared with (tests/bench/cpu_peak.py).
#include <cstdint>
#include <omp.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

extern "C" int q_bf16_peak(int64_t iterations, int threads, double* flops) {
#if defined(__AVX512BF16__)
  double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    __m512 acc[12];
    for (auto& a : acc) a = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = a;  // 1.0 in every lane
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
      __asm__ volatile("" : "+v"(a));  // keep the loop from being folded
    }
    __m512 sum = acc[0];
    for (int i = 1; i < 12; ++i) sum = _mm512_add_ps(sum, acc[i]);
    volatile float sink = _mm512_reduce_add_ps(sum);
    (void)sink;
    total += double(iterations) * 12 * 16 * 2 * 2;  // 16 lanes x 2 products, multiply + add
  }
  *flops = total;
  return 0;
#else
  (void)iterations, (void)threads, (void)flops;
  return 1;
#endif
}
