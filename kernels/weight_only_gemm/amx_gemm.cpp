// Weight-only int8 GEMM on AMX-BF16 tiles, for any number of tokens: the int8 weight is read
// once per call at its own size, widened to bf16 a strip at a time in the core's cache, and
// multiplied there by tdpbf16ps.
//
// Why: torch's packed int8 kernel is a GEMV run once per token, and dequantizing the whole
// weight for a call writes and reads back a bf16 copy: with the weights streaming from
// memory the first ran 1.3-1.6x bf16 GEMM's time at 8 tokens and 3-4x at 32, the second
// 4-5x (tests/bench/bench_decode_gemms_cpu.py).
//
// Layout (made once at load by cpp_impl.to_amx_layout): codes [N / 16][K / 2][16][2] int8,
// i.e. for each block of 16 output channels, row r holds the code pairs (k = 2r, 2r + 1) of
// the 16 channels in turn: widened to bf16 it is exactly the B operand AMX's tdpbf16ps
// reads (a 16 x 64-byte tile covers K = 32). Scales [N] fp32 (one per channel).
//
// Up to 4 tokens the same layout is read without tiles (few_tokens: fp32 FMAs on registers
// of widened codes); from 5 on, tdpbf16ps, 32 tokens per pass over a strip widened once.
//
// y[m, n] = (sum_k x[m, k] * code[n, k]) * scale[n]: bf16 products (the codes are exact in
// bf16) summed in fp32, one product by the scale, rounded to bf16. N % 16 == 0, K % 32 ==
// 0. The process must have been granted AMX state (q_amx_init) once.
#if !defined(__AMX_TILE__) || !defined(__AMX_BF16__) || !defined(__AVX512BF16__)
#error "this CPU has no AMX-BF16 tiles (or the compiler does not target them)"
#endif
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct TileConfig {  // the layout ldtilecfg reads (palette 1)
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// 16 sums times their channels' scales, rounded to bf16 (nearest even)
inline void store_row(const float* acc, __m512 scale, uint16_t* out) {
  const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc), scale));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)y);
}

// one 16-channel strip of codes (K / 2 rows of 32 bytes) -> bf16, the same layout
inline void widen_strip(const int8_t* src, uint16_t* dst, int64_t K) {
  for (int64_t r = 0; r < K / 2; ++r) {
    if ((r & 1) == 0)  // the next lines of this strip while these convert
      _mm_prefetch(reinterpret_cast<const char*>(src + r * 32 + 1024), _MM_HINT_T0);
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 32));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
    _mm512_store_si512(dst + r * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Up to 4 tokens: no tiles. Each 32-code row of a strip (16 channels x the pair k = 2r,
// 2r + 1) widens to fp32 in two registers and meets the activation pair, broadcast, in fp32
// FMAs; the pair's two lanes per channel are added at the end. The weight is read once.
template <int M>
void few_tokens_strip(const float* x, const int8_t* src, const float* scale, uint16_t* out,
                      int64_t N, int64_t K) {
  __m512 lo[M], hi[M];  // channels 0-7 and 8-15, two lanes each (k even, k odd)
  for (int m = 0; m < M; ++m) lo[m] = hi[m] = _mm512_setzero_ps();
  for (int64_t r = 0; r < K / 2; ++r) {
    if ((r & 1) == 0)  // 4 KB ahead: 1 KB left it 12% behind the plain-layout GEMV at M = 1
      _mm_prefetch(reinterpret_cast<const char*>(src + r * 32 + 4096), _MM_HINT_T0);
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * 32));
    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c)));
    const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1)));
    for (int m = 0; m < M; ++m) {
      double pair;  // (x[2r], x[2r + 1]) as one 64-bit lane, broadcast
      std::memcpy(&pair, x + m * K + 2 * r, sizeof pair);
      const __m512 xv = _mm512_castpd_ps(_mm512_set1_pd(pair));
      lo[m] = _mm512_fmadd_ps(w0, xv, lo[m]);
      hi[m] = _mm512_fmadd_ps(w1, xv, hi[m]);
    }
  }
  const __m512 sc = _mm512_loadu_ps(scale);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                          28, 30);
  for (int m = 0; m < M; ++m) {  // lane 2i + lane 2i+1 -> channel i
    const __m512 a = _mm512_add_ps(lo[m], _mm512_permute_ps(lo[m], 0xB1));
    const __m512 b = _mm512_add_ps(hi[m], _mm512_permute_ps(hi[m], 0xB1));
    const __m512 sums = _mm512_permutex2var_ps(a, evens, b);
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(sums, sc));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N), (__m256i)y);
  }
}

template <int M>
void few_tokens(const uint16_t* xb, const int8_t* codes, const float* scale, uint16_t* out,
                int64_t N, int64_t K, int threads) {
  std::vector<float> x(M * K);  // the activations widened once per call
  for (int64_t i = 0; i < M * K; ++i) {
    const uint32_t u = static_cast<uint32_t>(xb[i]) << 16;
    std::memcpy(&x[i], &u, sizeof u);
  }
  const int64_t strips = N / 16;
  const int nt = N * K >= (1 << 18) ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t s = 0; s < strips; ++s)
    few_tokens_strip<M>(x.data(), codes + s * K * 16, scale + s * 16, out + s * 16, N, K);
}

// tokens per chunk of the tile path: 128 x K bf16 activations (0.5-1.4 MB for K = 2048-5632)
// fit a 2 MB L2
constexpr int64_t kChunk = 128;

void configure(int rows) {  // C0 C1 (fp32 accumulators), A0 A1 (tokens), B (weights)
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = static_cast<uint8_t>(rows);
    cfg.colsb[t] = 64;
  }
  cfg.rows[4] = 16;
  cfg.colsb[4] = 64;
  _tile_loadconfig(&cfg);
}

}  // namespace

// 0 when this thread may use AMX tiles (Linux asks for the permission per process)
extern "C" int q_amx_init() {
  return static_cast<int>(syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                  18 /* XFEATURE_XTILEDATA */));
}

// x [M, K] bf16, codes in the layout above, scale [N] fp32; out [M, N] bf16.
extern "C" int q_wo_int8_amx(const uint16_t* x, const int8_t* codes, const float* scale,
                             uint16_t* out, int64_t M, int64_t N, int64_t K, int threads) {
  if (N % 16 || K % 32 || M < 1) return 1;
  switch (M) {  // a few tokens: the register path (no AMX state needed)
    case 1: few_tokens<1>(x, codes, scale, out, N, K, threads); return 0;
    case 2: few_tokens<2>(x, codes, scale, out, N, K, threads); return 0;
    case 3: few_tokens<3>(x, codes, scale, out, N, K, threads); return 0;
    case 4: few_tokens<4>(x, codes, scale, out, N, K, threads); return 0;
    default: break;
  }
  const int64_t strips = N / 16, steps = K / 32;
  const int nt = strips > 1 ? threads : 1;
#pragma omp parallel num_threads(nt)
  {
    std::vector<uint16_t> buffer(K * 16 + 32);
    // 64-byte aligned view of the thread's bf16 strip
    uint16_t* strip = reinterpret_cast<uint16_t*>(
        (reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t(63));
    alignas(64) float acc[16 * 16];
    int configured = 0;
    // Tokens in chunks whose activations stay in the core's L2 while every strip passes
    // over them (a prompt's 2048 tokens re-read from memory per strip cost more than
    // widening each strip once per chunk).
    for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
      const int64_t c1 = M - c0 < kChunk ? M : c0 + kChunk;
#pragma omp for schedule(static)
      for (int64_t s = 0; s < strips; ++s) {
        widen_strip(codes + s * K * 16, strip, K);
        for (int64_t m0 = c0; m0 < c1; m0 += 32) {  // 32 tokens per pass over the strip
          const int64_t rows0 = c1 - m0 < 16 ? c1 - m0 : 16;
          const int64_t rows1 = c1 - m0 - 16 < 16 ? (c1 - m0 - 16 > 0 ? c1 - m0 - 16 : 0) : 16;
          if (configured != rows0) {
            configure(static_cast<int>(rows0));
            configured = static_cast<int>(rows0);
          }
          // the second pair of tiles also loads 16 tokens: on a last pass of 17-31 it takes
          // the last 16 (overlapping the first tile's, which it computes to the same bits)
          const int64_t t1 = m0 + (rows1 == 16 ? 16 : rows1);
          const uint16_t* x1 = x + t1 * K;
          _tile_zero(0);
          _tile_zero(1);
          for (int64_t k = 0; k < steps; ++k) {
            _tile_loadd(4, strip + k * 512, 64);
            _tile_loadd(2, x + m0 * K + k * 32, K * 2);
            _tile_dpbf16ps(0, 2, 4);
            if (rows1) {
              _tile_loadd(3, x1 + k * 32, K * 2);
              _tile_dpbf16ps(1, 3, 4);
            }
          }
          const __m512 sc = _mm512_loadu_ps(scale + s * 16);
          _tile_stored(0, acc, 64);
          for (int64_t i = 0; i < rows0; ++i)
            store_row(acc + i * 16, sc, out + (m0 + i) * N + s * 16);
          if (rows1) {
            _tile_stored(1, acc, 64);
            for (int64_t i = 0; i < 16; ++i)
              store_row(acc + i * 16, sc, out + (t1 + i) * N + s * 16);
          }
        }
      }
    }
    if (configured) _tile_release();
  }
  return 0;
}
