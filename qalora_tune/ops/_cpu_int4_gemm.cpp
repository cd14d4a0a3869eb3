// qalora-tune: GEMMs against a CPU-packed int4 weight, with the weight dequantized into
// the GEMM's own packed panels (no dense copy of the weight, no separate pass over it).
//
// Built on first use by qalora_tune/ops/_cpu_int4_native.py with the system C++ compiler
// (AVX-512F/BW/VL and AVX512-BF16) and called through ctypes; OpenMP is torch's own
// libgomp (same soname, already loaded), so it shares torch's thread pool.
//
// Weight layout (aten._convert_weight_to_int4pack_for_cpu, AVX-512 build): rows of W are
// cut into blocks of 64; block b holds, for every k, 32 bytes: byte c has row c in its low
// nibble and row c + 32 in its high nibble. scale_and_zero is (n_groups_pad, N_pad, 2),
// and W[n, k] = (q - 8) * s[g, n] + z[g, n], g = k / G, computed in fp32 and rounded once
// to the compute dtype, exactly as qalora_tune.quantization.dequantize_packed does (the
// product (q - 8) * s is exact in fp32 for 16-bit scales, so a fused multiply-add rounds
// the same; fp32 scales take a separate multiply and add).
//
//   forward:        y = x @ W^T      x: (M, K)       panel: W^T[k0:k0+KC, 64 rows]
//   input gradient: g^T-major        gx^T = W^T @ g^T, W^T rows dequantized as the
//                                    broadcast operand, g^T as the streamed one.
//
// The micro-kernel keeps R x (16 * NJ) fp32 accumulators in registers: bf16 uses
// vdpbf16ps on pairs of the reduction dimension (the B operand interleaves two reduction
// steps per 32-bit lane), fp32 uses vfmadd231ps. Each panel's sum starts from zero and is
// then added to the result (blocked summation: the rounding error grows with the panel
// length and the number of panels, not with K).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <type_traits>

namespace {

constexpr int kBlockN = 64;   // rows of W per packed block
constexpr int kMaxR = 6;      // rows of the broadcast operand per micro-kernel call
constexpr int64_t kPanelK = 256;    // reduction steps per forward panel
constexpr int64_t kGradRows = 48;   // rows of W^T per input-gradient chunk
constexpr int64_t kGradCols = 2048; // reduction (W rows) per input-gradient chunk

// ------------------------------------------------------------------ dequantization

inline __m512 code_table() {
  return _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f,
                        0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
}

struct Scales {
  __m512 s[4];
  __m512 z[4];
};

inline __m512 bf16_to_fp32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// scale/zero of 64 rows of one group; sz points at [g][n0][0] (128 interleaved values)
inline void load_scales(const uint16_t* sz, Scales& out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int j = 0; j < 4; ++j) {
    __m512 a = bf16_to_fp32(_mm256_loadu_si256((const __m256i*)(sz + 32 * j)));
    __m512 b = bf16_to_fp32(_mm256_loadu_si256((const __m256i*)(sz + 32 * j + 16)));
    out.s[j] = _mm512_permutex2var_ps(a, even, b);
    out.z[j] = _mm512_permutex2var_ps(a, odd, b);
  }
}

inline void load_scales(const float* sz, Scales& out) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int j = 0; j < 4; ++j) {
    __m512 a = _mm512_loadu_ps(sz + 32 * j);
    __m512 b = _mm512_loadu_ps(sz + 32 * j + 16);
    out.s[j] = _mm512_permutex2var_ps(a, even, b);
    out.z[j] = _mm512_permutex2var_ps(a, odd, b);
  }
}

// 64 rows of one k from its 32 packed bytes: v[j] holds rows 16j .. 16j + 15
template <bool kExactProduct>
inline void dequantize64(const uint8_t* bytes, const Scales& sc, const __m512 table, __m512 v[4]) {
  __m512i w0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)bytes));
  __m512i w1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(bytes + 16)));
  // the permute reads the low 4 bits of each index: the low nibble, then the high one
  __m512 q[4] = {
      _mm512_permutexvar_ps(w0, table),
      _mm512_permutexvar_ps(w1, table),
      _mm512_permutexvar_ps(_mm512_srli_epi32(w0, 4), table),
      _mm512_permutexvar_ps(_mm512_srli_epi32(w1, 4), table),
  };
  for (int j = 0; j < 4; ++j) {
    if (kExactProduct) {
      v[j] = _mm512_fmadd_ps(q[j], sc.s[j], sc.z[j]);
    } else {
      v[j] = _mm512_add_ps(_mm512_mul_ps(q[j], sc.s[j]), sc.z[j]);
    }
  }
}

// ------------------------------------------------------------------ micro-kernels

// the micro-kernels' register tile: zeroed, then written (init) or added to C
template <int R, int NJ>
inline void zero_tile(__m512 (&acc)[R][NJ]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j)
      acc[r][j] = _mm512_setzero_ps();
}

template <int R, int NJ>
inline void store_tile(const __m512 (&acc)[R][NJ], float* c, int64_t ldc, bool init) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      float* out = c + r * ldc + 16 * j;
      _mm512_storeu_ps(out, init ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(out), acc[r][j]));
    }
}

// C[R, 16 NJ] (+)= A[R, 2P] . B[P, 16 NJ] for bf16: A rows are read as 32-bit pairs and
// broadcast, B holds pairs (B[2p, c], B[2p + 1, c]) per 32-bit lane.
template <int R, int NJ>
inline void micro_bf16(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                       int64_t pairs, float* c, int64_t ldc, bool init) {
  __m512 acc[R][NJ];
  zero_tile<R, NJ>(acc);
  const uint32_t* a32 = (const uint32_t*)a;
  const int64_t lda32 = lda / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) bv[j] = _mm512_loadu_si512((const void*)(b + p * ldb + 16 * j));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i av = _mm512_set1_epi32((int)a32[r * lda32 + p]);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j)
        acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)av, (__m512bh)bv[j]);
    }
  }
  store_tile<R, NJ>(acc, c, ldc, init);
}

// C[R, 16 NJ] (+)= A[R, S] . B[S, 16 NJ] in fp32
template <int R, int NJ>
inline void micro_fp32(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t steps,
                       float* c, int64_t ldc, bool init) {
  __m512 acc[R][NJ];
  zero_tile<R, NJ>(acc);
  for (int64_t s = 0; s < steps; ++s) {
    __m512 bv[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) bv[j] = _mm512_loadu_ps(b + s * ldb + 16 * j);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512 av = _mm512_set1_ps(a[r * lda + s]);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
    }
  }
  store_tile<R, NJ>(acc, c, ldc, init);
}

template <typename T>
struct Micro;

template <>
struct Micro<uint16_t> {
  template <int R, int NJ>
  static void run(const uint16_t* a, int64_t lda, const void* b, int64_t ldb, int64_t k,
                  float* c, int64_t ldc, bool init) {
    micro_bf16<R, NJ>(a, lda, (const uint32_t*)b, ldb, k / 2, c, ldc, init);
  }
};

template <>
struct Micro<float> {
  template <int R, int NJ>
  static void run(const float* a, int64_t lda, const void* b, int64_t ldb, int64_t k, float* c,
                  int64_t ldc, bool init) {
    micro_fp32<R, NJ>(a, lda, (const float*)b, ldb, k, c, ldc, init);
  }
};

// rows [0, rows) of A against NJ lane vectors of B, in micro-kernels of up to kMaxR rows
template <typename T, int NJ>
inline void rows_times_panel(const T* a, int64_t lda, const void* b, int64_t ldb, int64_t k,
                             float* c, int64_t ldc, int64_t rows, bool init) {
  int64_t r = 0;
  for (; r + kMaxR <= rows; r += kMaxR)
    Micro<T>::template run<kMaxR, NJ>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, init);
  switch (rows - r) {
    case 5: Micro<T>::template run<5, NJ>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, init); break;
    case 4: Micro<T>::template run<4, NJ>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, init); break;
    case 3: Micro<T>::template run<3, NJ>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, init); break;
    case 2: Micro<T>::template run<2, NJ>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, init); break;
    case 1: Micro<T>::template run<1, NJ>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, init); break;
    default: break;
  }
}

template <typename T>
inline void rows_times_lanes(const T* a, int64_t lda, const void* b, int64_t ldb, int64_t k,
                             float* c, int64_t ldc, int64_t rows, int nj, bool init) {
  switch (nj) {
    case 4: rows_times_panel<T, 4>(a, lda, b, ldb, k, c, ldc, rows, init); break;
    case 3: rows_times_panel<T, 3>(a, lda, b, ldb, k, c, ldc, rows, init); break;
    case 2: rows_times_panel<T, 2>(a, lda, b, ldb, k, c, ldc, rows, init); break;
    default: rows_times_panel<T, 1>(a, lda, b, ldb, k, c, ldc, rows, init); break;
  }
}

// ------------------------------------------------------------------ panels

// forward panel of a bf16 GEMM: k pairs x 64 rows, (W[n, k], W[n, k + 1]) per 32-bit lane
inline void forward_panel(const uint8_t* block, const uint16_t* sz, int64_t n_pad, int64_t group,
                          int64_t k0, int64_t kc, uint32_t* panel) {
  const __m512 table = code_table();
  // 16-bit lane 2i takes element i (row i of k), lane 2i + 1 element 16 + i (row i of k + 1)
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  Scales sc;
  for (int64_t k = k0; k < k0 + kc; k += 2) {
    if (k == k0 || k % group == 0) load_scales(sz + (k / group) * n_pad * 2, sc);
    __m512 lo[4], hi[4];
    dequantize64<true>(block + k * 32, sc, table, lo);
    dequantize64<true>(block + (k + 1) * 32, sc, table, hi);
    uint32_t* out = panel + (k - k0) / 2 * kBlockN;
    for (int j = 0; j < 4; ++j) {
      __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi[j], lo[j]);  // [k rows j, k+1 rows j]
      _mm512_storeu_si512((void*)(out + 16 * j), _mm512_permutexvar_epi16(pairs, both));
    }
  }
}

// forward panel in fp32: kc x 64 rows
inline void forward_panel(const uint8_t* block, const float* sz, int64_t n_pad, int64_t group,
                          int64_t k0, int64_t kc, float* panel) {
  const __m512 table = code_table();
  Scales sc;
  for (int64_t k = k0; k < k0 + kc; ++k) {
    if (k == k0 || k % group == 0) load_scales(sz + (k / group) * n_pad * 2, sc);
    __m512 v[4];
    dequantize64<false>(block + k * 32, sc, table, v);
    float* out = panel + (k - k0) * kBlockN;
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(out + 16 * j, v[j]);
  }
}

// 64 dequantized values of one row of W^T, stored in bf16 or in fp32
inline void store64(const __m512 v[4], uint16_t* row) {
  _mm512_storeu_si512((void*)row, (__m512i)_mm512_cvtne2ps_pbh(v[1], v[0]));
  _mm512_storeu_si512((void*)(row + 32), (__m512i)_mm512_cvtne2ps_pbh(v[3], v[2]));
}

inline void store64(const __m512 v[4], float* row) {
  for (int j = 0; j < 4; ++j) _mm512_storeu_ps(row + 16 * j, v[j]);
}

// rows k0 .. k0 + rows of W^T for the row blocks [b0, b1), into a (rows, ld) buffer; T is
// the compute dtype's storage (uint16_t: bf16, float: fp32), of scales and output alike
template <typename T>
inline void transposed_rows(const uint8_t* packed, const T* sz, int64_t n_pad, int64_t k,
                            int64_t group, int64_t k0, int64_t rows, int64_t b0, int64_t b1,
                            T* out, int64_t ld) {
  const __m512 table = code_table();
  Scales sc;
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* block = packed + b * k * 32;
    for (int64_t kk = k0; kk < k0 + rows; ++kk) {
      if (kk == k0 || kk % group == 0) load_scales(sz + (kk / group) * n_pad * 2 + b * kBlockN * 2, sc);
      __m512 v[4];
      dequantize64<std::is_same<T, uint16_t>::value>(block + kk * 32, sc, table, v);
      store64(v, out + (kk - k0) * ld + (b - b0) * kBlockN);
    }
  }
}

inline void store_row(const float* c, uint16_t* y, int64_t count) {
  int64_t i = 0;
  for (; i + 32 <= count; i += 32) {
    __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(c + i + 16), _mm512_loadu_ps(c + i));
    _mm512_storeu_si512((void*)(y + i), both);
  }
  for (; i < count; i += 16) {
    int64_t n = std::min<int64_t>(16, count - i);
    __mmask16 mask = (__mmask16)((1u << n) - 1);
    __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, c + i));
    _mm256_mask_storeu_epi16((void*)(y + i), mask, half);
  }
}

inline void store_row(const float* c, float* y, int64_t count) { memcpy(y, c, count * sizeof(float)); }

template <typename T>
struct Buffers {
  void* panel = nullptr;
  float* acc = nullptr;
  ~Buffers() {
    free(panel);
    free(acc);
  }
};

inline void* aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

// y[:, :n_out] = x @ W^T, x (M, K) with row stride lda, y with row stride ldy
template <typename T>
void linear(const T* x, int64_t m, int64_t k, int64_t lda, const uint8_t* packed, const T* sz,
            int64_t n_pad, int64_t group, T* y, int64_t n_out, int64_t ldy, int threads) {
  const int64_t blocks = (n_out + kBlockN - 1) / kBlockN;
  using PanelT = typename std::conditional<sizeof(T) == 2, uint32_t, float>::type;
  const int64_t panel_k = sizeof(T) == 2 ? kPanelK : kPanelK / 2;
#pragma omp parallel num_threads(threads)
  {
    void* panel = aligned(panel_k * kBlockN * sizeof(T));
    float* acc = (float*)aligned(m * kBlockN * sizeof(float));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* block = packed + b * k * 32;
      const T* block_sz = sz + b * kBlockN * 2;
      for (int64_t k0 = 0; k0 < k; k0 += panel_k) {
        const int64_t kc = std::min(panel_k, k - k0);
        forward_panel(block, block_sz, n_pad, group, k0, kc, (PanelT*)panel);
        rows_times_panel<T, 4>(x + k0, lda, panel, kBlockN, kc, acc, kBlockN, m, k0 == 0);
      }
      const int64_t cols = std::min<int64_t>(kBlockN, n_out - b * kBlockN);
      for (int64_t r = 0; r < m; ++r) store_row(acc + r * kBlockN, y + r * ldy + b * kBlockN, cols);
    }
    free(panel);
    free(acc);
  }
}

// out (K, Mp) fp32 = W^T @ gT, gT the transposed output gradient: bf16 as (N_pad / 2, Mp)
// 32-bit pairs, fp32 as (N_pad, Mp); Mp a multiple of 16
template <typename T>
void grad_input(const void* gt, int64_t mp, const uint8_t* packed, const T* sz, int64_t n_pad,
                int64_t k, int64_t group, float* out, int threads) {
  const int64_t blocks = n_pad / kBlockN;
  const int64_t chunks = (k + kGradRows - 1) / kGradRows;
  const int64_t per_row = sizeof(T) == 2 ? 2 : 1;  // reduction steps per lane word of gT
#pragma omp parallel num_threads(threads)
  {
    T* rows = (T*)aligned(kGradRows * kGradCols * sizeof(T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t k0 = chunk * kGradRows;
      const int64_t count = std::min(kGradRows, k - k0);
      for (int64_t b0 = 0; b0 < blocks; b0 += kGradCols / kBlockN) {
        const int64_t b1 = std::min(blocks, b0 + kGradCols / kBlockN);
        const int64_t n0 = b0 * kBlockN, width = (b1 - b0) * kBlockN;
        transposed_rows(packed, sz, n_pad, k, group, k0, count, b0, b1, rows, kGradCols);
        const char* g = (const char*)gt + (n0 / per_row) * mp * 4;
        for (int64_t m0 = 0; m0 < mp; m0 += 64) {
          const int nj = (int)std::min<int64_t>(4, (mp - m0) / 16);
          rows_times_lanes<T>(rows, kGradCols, (const uint32_t*)g + m0, mp, width,
                              out + k0 * mp + m0, mp, count, nj, b0 == 0);
        }
      }
    }
    free(rows);
  }
}

}  // namespace

extern "C" {

int qalora_int4_linear_bf16(const uint16_t* x, int64_t m, int64_t k, int64_t lda,
                            const uint8_t* packed, const uint16_t* sz, int64_t n_pad,
                            int64_t group, uint16_t* y, int64_t n_out, int64_t ldy, int threads) {
  linear<uint16_t>(x, m, k, lda, packed, sz, n_pad, group, y, n_out, ldy, threads);
  return 0;
}

int qalora_int4_linear_fp32(const float* x, int64_t m, int64_t k, int64_t lda,
                            const uint8_t* packed, const float* sz, int64_t n_pad, int64_t group,
                            float* y, int64_t n_out, int64_t ldy, int threads) {
  linear<float>(x, m, k, lda, packed, sz, n_pad, group, y, n_out, ldy, threads);
  return 0;
}

int qalora_int4_grad_input_bf16(const void* gt, int64_t mp, const uint8_t* packed,
                                const uint16_t* sz, int64_t n_pad, int64_t k, int64_t group,
                                float* out, int threads) {
  grad_input<uint16_t>(gt, mp, packed, sz, n_pad, k, group, out, threads);
  return 0;
}

int qalora_int4_grad_input_fp32(const void* gt, int64_t mp, const uint8_t* packed,
                                const float* sz, int64_t n_pad, int64_t k, int64_t group,
                                float* out, int threads) {
  grad_input<float>(gt, mp, packed, sz, n_pad, k, group, out, threads);
  return 0;
}

}  // extern "C"
