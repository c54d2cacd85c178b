// One decode step of a Llama-family model on a CPU, every layer in one call.
//
// loracord's fast decode step (core/model/fast.py) spends most of a 1-row step on a 2-core
// CPU in ~35 small torch operations per layer, each a few microseconds of dispatch. Here the
// small work (RMSNorm, rotary embedding, the cache writes, attention over each row's cache,
// residual adds, SiLU) runs as loops, and the 4-bit products are the step's own integer dot
// products on the 4-bit codes, with x quantized to int16 per group:
// - bf16 activations (a CPU with AVX512-BF16): `linear_q4`, AVX512-VNNI, on GPTQModel's AVX512
//   layout; activations are rounded to bf16 where the eager bf16 step rounds them;
// - fp32 activations (every other x86-64 CPU with AVX2, FMA and F16C): `linear_q4_avx2`, on
//   loracord's layout (core/model/q4_cpu.py).
// The cache and attention are fp32 in both. Built at first use with torch's cpp_extension (with
// OpenMP, which `at::parallel_for` needs to use more than one thread) and cached under the cache
// dir, one build per CPU kind (-march=native).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define LORACORD_VNNI 1
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LORACORD_AVX2 1
#endif

namespace {

using bf16 = at::BFloat16;

// v rounded to the activations' type T and read back: where the eager bf16 step rounds, the bf16
// step rounds; in fp32 nothing is rounded.
template <typename T>
inline float rounded(float v) {
  return static_cast<float>(T(v));
}

// out[r] = x[r] / rms(x[r]) * weight, rounded to T once.
template <typename T>
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t n = x.size(0), d = x.size(1);
  auto out = at::empty_like(x);
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t r = 0; r < n; ++r) {
    const T* row = xp + r * d;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) {
      const float v = static_cast<float>(row[i]);
      sum += v * v;
    }
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) {
      op[r * d + i] = T(static_cast<float>(row[i]) * inv * static_cast<float>(wp[i]));
    }
  }
  return out;
}

// The LoRA terms of one 4-bit product: y[r, part] += (x[r] @ A[s].T) @ B[s].T for each token r
// on a slot s > 0, the term rounded to T before the add (as the eager step adds it). A part is
// one projection's outputs within the product (q, k and v share qkv's x and outputs). `shrink`
// computes low = x @ A[s].T on the calling thread before the product; the product's threads
// then add low @ B[s].T to the outputs each of them wrote (`expand`), inside the product's own
// parallel region: an OpenMP region costs microseconds here, more than splitting the shrink
// saves (measured). Only each slot's first `ranks[s]` rows are read (the slots are zero-padded
// to their largest rank): the terms' cost is those reads, which the step's weights have pushed
// out of the caches, ~0.2 ms a step for rank 8 on the embedded model (BENCHMARKS.md).
struct LoraPart {
  const float* a;   // [slots + 1, max_rank, in]
  const float* bt;  // B transposed, pre-scaled: [slots + 1, max_rank, out]
  int64_t offset;   // the part's first output within the product
  int64_t out;
};

struct LoraTerms {
  std::vector<LoraPart> parts;
  const std::vector<int64_t>* slots = nullptr;  // per token
  const std::vector<int64_t>* ranks = nullptr;  // per slot
  int64_t max_rank = 0;
  std::vector<float> low;  // [parts, n, max_rank]

  template <typename T>
  void shrink(const T* x, int64_t n, int64_t in) {
    low.assign(parts.size() * n * max_rank, 0.f);
    thread_local std::vector<float> xf;
    xf.resize(in);
    for (int64_t r = 0; r < n; ++r) {
      const int64_t s = (*slots)[r], rank = (*ranks)[s];
      if (s == 0 || rank == 0) continue;
      for (int64_t i = 0; i < in; ++i) xf[i] = static_cast<float>(x[r * in + i]);
      for (size_t p = 0; p < parts.size(); ++p) {
        const float* as = parts[p].a + s * max_rank * in;
        float* lp = low.data() + (p * n + r) * max_rank;
        for (int64_t j = 0; j < rank; ++j) {
          const float* aj = as + j * in;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < in; ++i) dot += xf[i] * aj[i];
          lp[j] = dot;
        }
      }
    }
  }

  // The terms of outputs [begin, end) of every token, added into y [n, y_stride].
  template <typename T>
  void expand(int64_t begin, int64_t end, T* y, int64_t y_stride, int64_t n) const {
    thread_local std::vector<float> delta;
    for (size_t p = 0; p < parts.size(); ++p) {
      const LoraPart& part = parts[p];
      const int64_t lo = std::max(begin, part.offset), hi = std::min(end, part.offset + part.out);
      if (lo >= hi) continue;
      const int64_t width = hi - lo;
      delta.resize(width);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t s = (*slots)[r], rank = (*ranks)[s];
        if (s == 0 || rank == 0) continue;
        const float* lp = low.data() + (p * n + r) * max_rank;
        const float* bs = part.bt + s * max_rank * part.out + (lo - part.offset);
        float* dp = delta.data();
        std::fill(dp, dp + width, 0.f);
        for (int64_t j = 0; j < rank; ++j) {
          const float v = lp[j];
          const float* bj = bs + j * part.out;
#pragma omp simd
          for (int64_t i = 0; i < width; ++i) dp[i] += v * bj[i];
        }
        T* row = y + r * y_stride + lo;
        for (int64_t i = 0; i < width; ++i) {
          row[i] = T(static_cast<float>(row[i]) + rounded<T>(dp[i]));
        }
      }
    }
  }
};

#ifdef LORACORD_VNNI
// 16 bf16 -> fp32 (a 16-bit shift), and fp32 -> bf16 rounded to nearest even (as c10 rounds)
static inline __m512 load_bf16x16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
static inline __m512 round_bf16x16(__m512 v) {
  const __m256i half = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
static inline void store_bf16x16(bf16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// e^v for 16 lanes, within ~2 ulp of fp32 (Cephes' expf: v = n ln2 + r, |r| <= ln2 / 2, a
// degree-6 polynomial for e^r, times 2^n); below -87.3 it is 0 and above 88.7 infinity.
static inline __m512 exp16(__m512 v) {
  v = _mm512_max_ps(_mm512_min_ps(v, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#ifdef LORACORD_AVX2
// e^v for 8 lanes: the same Cephes expf as exp16 (AVX512 above), 2^n built in the exponent bits.
static inline __m256 exp8(__m256 v) {
  v = _mm256_max_ps(_mm256_min_ps(v, _mm256_set1_ps(88.7f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // n in [-126, 128]: 2^n as exponent bits (128 gives infinity, as e^88.7 nearly is)
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

static inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#endif

// y += x elementwise, rounded to T (the residual adds of a layer).
template <typename T>
static inline void add_into(T* y, const T* x, int64_t count) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, bf16>) {
#ifdef LORACORD_VNNI
    for (; i + 16 <= count; i += 16) store_bf16x16(y + i, _mm512_add_ps(load_bf16x16(y + i), load_bf16x16(x + i)));
#endif
  }
  for (; i < count; ++i) y[i] = T(static_cast<float>(y[i]) + static_cast<float>(x[i]));
}

// e^(v[t] - peak) for t < count, written back, and their sum.
static inline float exp_shifted(float* v, int64_t count, float peak) {
  float total = 0.f;
  int64_t t = 0;
#if defined(LORACORD_VNNI)
  __m512 vtotal = _mm512_setzero_ps();
  for (; t + 16 <= count; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(v + t), _mm512_set1_ps(peak)));
    _mm512_storeu_ps(v + t, e);
    vtotal = _mm512_add_ps(vtotal, e);
  }
  total = _mm512_reduce_add_ps(vtotal);
#elif defined(LORACORD_AVX2)
  __m256 vtotal = _mm256_setzero_ps();
  for (; t + 8 <= count; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(v + t), _mm256_set1_ps(peak)));
    _mm256_storeu_ps(v + t, e);
    vtotal = _mm256_add_ps(vtotal, e);
  }
  total = sum8(vtotal);
#endif
  for (; t < count; ++t) {
    v[t] = std::exp(v[t] - peak);
    total += v[t];
  }
  return total;
}

// act[i] = silu(gate[i]) * up[i] for `count` values, silu rounded to T (as the eager step's
// activation module returns it) and the product rounded to T.
template <typename T>
static inline void silu_mul(const T* gate, const T* up, T* act, int64_t count) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, bf16>) {
#ifdef LORACORD_VNNI
    for (; i + 16 <= count; i += 16) {  // the same roundings as the scalar loop below
      const __m512 g = load_bf16x16(gate + i);
      const __m512 u = load_bf16x16(up + i);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = round_bf16x16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
      store_bf16x16(act + i, _mm512_mul_ps(silu, u));
    }
#endif
  } else {
#ifdef LORACORD_AVX2
    for (; i + 8 <= count; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
      _mm256_storeu_ps(act + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
#endif
  }
  for (; i < count; ++i) {
    const float g = static_cast<float>(gate[i]);
    const float silu = rounded<T>(g / (1.f + std::exp(-g)));
    act[i] = T(silu * static_cast<float>(up[i]));
  }
}

// The 4-bit products below quantize x to int16 per row and group: the group's largest |x| maps
// to 32767, so its absolute error is at most 1/65534 of that (finer than bf16 rounds the same
// values), the code sums are exact in int32, and the group sums of x are exact fp32 sums.
struct Q4Rows {
  std::vector<int16_t> q;   // [n, in]
  std::vector<float> step;  // [n, groups]: the int16 step of each row's group
  std::vector<float> sum;   // [n, groups]: the group's sum of x
};

template <typename T>
static void quantize_rows(const T* x, int64_t n, int64_t in, int64_t group, Q4Rows& rows) {
  const int64_t groups = in / group;
  rows.q.resize(n * in);
  rows.step.resize(n * groups);
  rows.sum.resize(n * groups);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const T* xg = x + r * in + g * group;
      float peak = 0.f, sum = 0.f;
      for (int64_t i = 0; i < group; ++i) {
        const float v = static_cast<float>(xg[i]);
        peak = std::max(peak, std::abs(v));
        sum += v;
      }
      const float step = peak / 32767.f;
      const float inv = step > 0.f ? 1.f / step : 0.f;
      int16_t* qg = rows.q.data() + r * in + g * group;
      for (int64_t i = 0; i < group; ++i) {
        qg[i] = static_cast<int16_t>(std::nearbyint(static_cast<float>(xg[i]) * inv));
      }
      rows.step[r * groups + g] = step;
      rows.sum[r * groups + g] = sum;
    }
  }
}

// What both 4-bit products check before their unchecked loops; returns `out`.
int64_t check_q4(const char* name, const at::Tensor& x, at::ScalarType dtype, const at::Tensor& qweight,
                 const at::Tensor& scale_offsets, int64_t group, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == dtype, name, ": x [n, in] ",
              dtype == at::kBFloat16 ? "bf16" : "fp32");
  const int64_t in = x.size(1);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(1) * 2 == in && qweight.size(0) % block == 0,
              name, ": qweight [out, in / 2] uint8, out a multiple of ", block);
  const int64_t out = qweight.size(0);
  TORCH_CHECK(group > 0 && group % 4 == 0 && in % group == 0, name,
              ": groups of a multiple of 4 inputs dividing the inputs");
  TORCH_CHECK(scale_offsets.scalar_type() == at::kHalf && scale_offsets.is_contiguous() &&
                  scale_offsets.dim() == 2 && scale_offsets.size(0) == in / group &&
                  scale_offsets.size(1) == 2 * out,
              name, ": fp16 scales and offsets [groups, 2 out]");
  return out;
}

#ifdef LORACORD_VNNI
// 4-bit products with integer dot products (AVX512-VNNI), reading GPTQModel's AVX512 layout as
// it is: `qweight` [out, in / 2] bytes, whose flat order is [out / 32, in / 2, 16, 2]: for each
// block of 32 outputs and each pair of inputs (2h, 2h + 1), byte (k, e) holds output k's code
// for input 2h + e in its low nibble and output k + 16's in its high nibble. Widened to 16 bits,
// the low nibbles are 16 lanes of (code(k, 2h), code(k, 2h + 1)), exactly vpdpwssd's pairs, and
// so are the high nibbles for outputs 16-31: 64 weights from 32 bytes in three instructions.
//
// Each weight is `scale * code + offset` per group and output, `offset = residual - scale *
// zero` (core/model/residuals.py; the GGUF's own Q4_1 offset for the carried-over build), so
//   y[o] = sum_g scale[g, o] * sum_{i in g} x[i] * code[i, o] + offset[g, o] * sum_{i in g} x[i]
// and the zero-point residual costs nothing beyond the offset's read. x is quantized to int16
// per row and group (the group's largest |x| maps to 32767: its absolute error is at most
// 1/65534 of that, finer than bf16 rounds the same values), the code sums are exact in int32,
// and the group sums of x are exact fp32 sums of the bf16 values.
// Every fp32 sum of a block of outputs set to zero.
template <int J, int R>
static inline void zero_sums(__m512 (&v)[J][2][R]) {
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
    for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
      for (int c = 0; c < R; ++c) v[a][hh][c] = _mm512_setzero_ps();
}

// J blocks of 32 outputs from block `b`, times R rows of x from row `r`; two accumulators per
// block half and row (even and odd input pairs), so 4 J R independent chains of vpdpwssd. The
// high nibbles are masked in place (16 code) rather than shifted: the shift would share the
// vpdpwssd port, the mask does not; the factor 16 leaves with the group's step. Sums run in
// int32 over at most 256 inputs (each product pair is below 2^24), then in fp32.
template <int J, int R>
static inline void q4_block(const uint8_t* wp, const at::Half* smp, const Q4Rows& rows, bf16* yp,
                            int64_t in, int64_t out, int64_t group, int64_t b, int64_t r) {
  constexpr int64_t kChunk = 128;  // input pairs summed in int32 before fp32
  const int64_t groups = in / group, pairs = group / 2;
  const __m512i low_nibbles = _mm512_set1_epi16(0x0F);
  const __m512i high_nibbles = _mm512_set1_epi16(0xF0);
  __m512 y[J][2][R];
  zero_sums(y);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 dot[J][2][R];
    zero_sums(dot);
    for (int64_t h0 = g * pairs; h0 < (g + 1) * pairs; h0 += kChunk) {
      const int64_t h1 = std::min(h0 + kChunk, (g + 1) * pairs);
      __m512i acc[J][2][R][2];
#pragma GCC unroll 8
      for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
        for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
          for (int c = 0; c < R; ++c) acc[a][hh][c][0] = acc[a][hh][c][1] = _mm512_setzero_si512();
      for (int64_t h = h0; h < h1; h += 2) {
#pragma GCC unroll 2
        for (int e = 0; e < 2; ++e) {
          __m512i xb[R];
#pragma GCC unroll 8
          for (int c = 0; c < R; ++c) {
            int32_t pair;
            std::memcpy(&pair, rows.q.data() + (r + c) * in + 2 * (h + e), sizeof(pair));
            xb[c] = _mm512_set1_epi32(pair);
          }
#pragma GCC unroll 8
          for (int a = 0; a < J; ++a) {
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(wp + ((b + a) * (in / 2) + h + e) * 32)));
            const __m512i lo = _mm512_and_si512(w, low_nibbles);
            const __m512i hi = _mm512_and_si512(w, high_nibbles);
#pragma GCC unroll 8
            for (int c = 0; c < R; ++c) {
              acc[a][0][c][e] = _mm512_dpwssd_epi32(acc[a][0][c][e], lo, xb[c]);
              acc[a][1][c][e] = _mm512_dpwssd_epi32(acc[a][1][c][e], hi, xb[c]);
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
        for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
          for (int c = 0; c < R; ++c) {
            const __m512i sum = _mm512_add_epi32(acc[a][hh][c][0], acc[a][hh][c][1]);
            dot[a][hh][c] = _mm512_add_ps(dot[a][hh][c], _mm512_cvtepi32_ps(sum));
          }
    }
#pragma GCC unroll 8
    for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
      for (int hh = 0; hh < 2; ++hh) {
        const int64_t o = (b + a) * 32 + hh * 16;
        const at::Half* sm = smp + g * 2 * out + 2 * o;  // 16 scales, then 16 offsets
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sm + 16)));
#pragma GCC unroll 8
        for (int c = 0; c < R; ++c) {
          const float step = rows.step[(r + c) * groups + g] * (hh ? 1.f / 16.f : 1.f);
          const float sum = rows.sum[(r + c) * groups + g];
          const __m512 scaled = _mm512_mul_ps(dot[a][hh][c], _mm512_set1_ps(step));
          y[a][hh][c] = _mm512_fmadd_ps(scaled, s, y[a][hh][c]);
          y[a][hh][c] = _mm512_fmadd_ps(m, _mm512_set1_ps(sum), y[a][hh][c]);
        }
      }
  }
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
    for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
      for (int c = 0; c < R; ++c) store_bf16x16(yp + (r + c) * out + (b + a) * 32 + hh * 16, y[a][hh][c]);
}

// The VNNI products for linear_q4_as (below): GPTQModel's layout, 32 outputs a block, bf16.
struct VnniProducts {
  using T = bf16;
  static constexpr int kRows = 4;
  static constexpr int64_t kBlock = 32;
  template <int J, int R>
  static void block(const uint8_t* wp, const at::Half* smp, const Q4Rows& rows, bf16* yp, int64_t in,
                    int64_t out, int64_t group, int64_t b, int64_t r) {
    q4_block<J, R>(wp, smp, rows, yp, in, out, group, b, r);
  }
};
#endif


#ifdef LORACORD_AVX2
// 4-bit products for fp32 activations with AVX2, on loracord's layout (core/model/q4_cpu.py):
// `qweight` [out, in / 2] bytes whose flat order is [out / 16, in / 2, 8, 2]: for each block of
// 16 outputs and each pair of inputs (2h, 2h + 1), byte (k, e) holds output k's code for input
// 2h + e in its low nibble and output k + 8's in its high nibble. Widened to 16 bits, the low
// nibbles are 8 lanes of (code(k, 2h), code(k, 2h + 1)), vpmaddwd's pairs, and so are the high
// nibbles (masked in place: 16 code) for outputs 8-15: 32 weights from 16 bytes, each vpmaddwd
// 16 products. Scales and offsets are `linear_q4`'s (for each group and 16 outputs, 16 fp16
// scales then 16 fp16 offsets), and so is the arithmetic: int32 sums per group (in chunks of
// 128 input pairs, each lane's pair of products being below 2^24), then fp32.
template <int J, int R>
static inline void q4_block_avx2(const uint8_t* wp, const at::Half* smp, const Q4Rows& rows, float* yp,
                                 int64_t in, int64_t out, int64_t group, int64_t b, int64_t r) {
  constexpr int64_t kChunk = 128;
  const int64_t groups = in / group, pairs = group / 2;
  const __m256i low_nibbles = _mm256_set1_epi16(0x0F);
  const __m256i high_nibbles = _mm256_set1_epi16(0xF0);
  const uint8_t* wrow[J];  // each block's codes, 16 bytes per input pair
  const int16_t* xrow[R];  // each row's int16 x
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a) wrow[a] = wp + (b + a) * (in / 2) * 16;
#pragma GCC unroll 8
  for (int c = 0; c < R; ++c) xrow[c] = rows.q.data() + (r + c) * in;
  __m256 y[J][2][R];
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
    for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
      for (int c = 0; c < R; ++c) y[a][hh][c] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const at::Half* sm = smp + g * 2 * out;
    for (int64_t h0 = g * pairs; h0 < (g + 1) * pairs; h0 += kChunk) {
      const int64_t h1 = std::min(h0 + kChunk, (g + 1) * pairs);
      __m256i acc[J][2][R];
#pragma GCC unroll 8
      for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
        for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
          for (int c = 0; c < R; ++c) acc[a][hh][c] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int64_t h = h0; h < h1; ++h) {
        __m256i xb[R];
#pragma GCC unroll 8
        for (int c = 0; c < R; ++c) {
          int32_t pair;
          std::memcpy(&pair, xrow[c] + 2 * h, sizeof(pair));
          xb[c] = _mm256_set1_epi32(pair);
        }
#pragma GCC unroll 8
        for (int a = 0; a < J; ++a) {
          const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow[a] + h * 16)));
          const __m256i lo = _mm256_and_si256(w, low_nibbles);
          const __m256i hi = _mm256_and_si256(w, high_nibbles);
#pragma GCC unroll 8
          for (int c = 0; c < R; ++c) {
            acc[a][0][c] = _mm256_add_epi32(acc[a][0][c], _mm256_madd_epi16(lo, xb[c]));
            acc[a][1][c] = _mm256_add_epi32(acc[a][1][c], _mm256_madd_epi16(hi, xb[c]));
          }
        }
      }
#pragma GCC unroll 8
      for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
        for (int hh = 0; hh < 2; ++hh) {
          const __m256 s = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + 2 * (b + a) * 16 + hh * 8)));
#pragma GCC unroll 8
          for (int c = 0; c < R; ++c) {
            const float step = rows.step[(r + c) * groups + g] * (hh ? 1.f / 16.f : 1.f);
            y[a][hh][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[a][hh][c]),
                                          _mm256_mul_ps(s, _mm256_set1_ps(step)), y[a][hh][c]);
          }
        }
    }
#pragma GCC unroll 8
    for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
      for (int hh = 0; hh < 2; ++hh) {
        const __m256 m = _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(sm + 2 * (b + a) * 16 + 16 + hh * 8)));
#pragma GCC unroll 8
        for (int c = 0; c < R; ++c) {
          y[a][hh][c] = _mm256_fmadd_ps(m, _mm256_set1_ps(rows.sum[(r + c) * groups + g]), y[a][hh][c]);
        }
      }
  }
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 2
    for (int hh = 0; hh < 2; ++hh)
#pragma GCC unroll 8
      for (int c = 0; c < R; ++c) _mm256_storeu_ps(yp + (r + c) * out + (b + a) * 16 + hh * 8, y[a][hh][c]);
}

// The AVX2 products for linear_q4_as (below): loracord's layout, 16 outputs a block, fp32.
struct Avx2Products {
  using T = float;
  static constexpr int64_t kBlock = 16;
  // The most rows a block multiplies at once. Four rows keep 8 int32 sums, 4 broadcasts of x and
  // the codes live in the inner loop: more than AVX2's 16 ymm registers (spilled, slower than
  // two rows twice), within the 32 an AVX512 CPU gives the same code.
#ifdef __AVX512VL__
  static constexpr int kRows = 4;
#else
  static constexpr int kRows = 2;
#endif
  template <int J, int R>
  static void block(const uint8_t* wp, const at::Half* smp, const Q4Rows& rows, float* yp, int64_t in,
                    int64_t out, int64_t group, int64_t b, int64_t r) {
    q4_block_avx2<J, R>(wp, smp, rows, yp, in, out, group, b, r);
  }
};
#endif

// y [n, out] = x [n, in] times a 4-bit matrix, both in K::T: the front both products share.
// `scale_offsets`: fp16 [groups, 2 out], for each group and 16 outputs their 16 scales then their
// 16 offsets, so a group of a block reads one cache line of them. x is quantized once; each
// thread then runs its blocks of K::kBlock outputs: one row two blocks at a time (independent
// loads and sums), several rows up to K::kRows at a time per block (each weight widened once).
// With `lora`, each thread adds the LoRA terms of the outputs it wrote (LoraTerms::expand).
template <typename K>
at::Tensor linear_q4_as(const char* name, const at::Tensor& x, const at::Tensor& qweight,
                        const at::Tensor& scale_offsets, int64_t group, const LoraTerms* lora = nullptr) {
  using T = typename K::T;
  const auto dtype = std::is_same_v<T, bf16> ? at::kBFloat16 : at::kFloat;
  const int64_t out = check_q4(name, x, dtype, qweight, scale_offsets, group, K::kBlock);
  const int64_t n = x.size(0), in = x.size(1);
  const auto xc = x.contiguous();
  thread_local Q4Rows rows;
  quantize_rows<T>(xc.data_ptr<T>(), n, in, group, rows);
  auto y = at::empty({n, out}, x.options());
  const uint8_t* wp = qweight.data_ptr<uint8_t>();
  const at::Half* smp = scale_offsets.data_ptr<at::Half>();
  T* yp = y.data_ptr<T>();
  const Q4Rows& shared = rows;  // read by every thread of the loop below
  at::parallel_for(0, out / K::kBlock, 4, [&](int64_t begin, int64_t end) {
    int64_t b = begin;
    if (n == 1) {
      for (; b + 2 <= end; b += 2) K::template block<2, 1>(wp, smp, shared, yp, in, out, group, b, 0);
      for (; b < end; ++b) K::template block<1, 1>(wp, smp, shared, yp, in, out, group, b, 0);
    } else {
      for (; b < end; ++b) {
        int64_t r = 0;
        if constexpr (K::kRows >= 4) {
          for (; r + 4 <= n; r += 4) K::template block<1, 4>(wp, smp, shared, yp, in, out, group, b, r);
        }
        for (; r + 2 <= n; r += 2) K::template block<1, 2>(wp, smp, shared, yp, in, out, group, b, r);
        for (; r < n; ++r) K::template block<1, 1>(wp, smp, shared, yp, in, out, group, b, r);
      }
    }
    if (lora != nullptr) lora->expand<T>(begin * K::kBlock, end * K::kBlock, yp, out, n);
  });
  return y;
}

#ifdef LORACORD_VNNI
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale_offsets,
                     int64_t group) {
  return linear_q4_as<VnniProducts>("linear_q4", x, qweight, scale_offsets, group);
}
#endif

#ifdef LORACORD_AVX2
at::Tensor linear_q4_avx2(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale_offsets,
                          int64_t group) {
  return linear_q4_as<Avx2Products>("linear_q4_avx2", x, qweight, scale_offsets, group);
}
#endif

// One head of one row: softmax(q . k_t * scaling) over the `span` cached positions, times v_t,
// rounded to T into `out`. `scores` holds `span` floats.
template <typename T>
static void attend_head(const float* q, const float* kbase, const float* vbase, int64_t span,
                        int64_t head_dim, float scaling, float* scores, T* out) {
  float peak = -INFINITY;
  for (int64_t t = 0; t < span; ++t) {
    const float* kt = kbase + t * head_dim;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < head_dim; ++i) dot += q[i] * kt[i];
    scores[t] = dot * scaling;
    peak = std::max(peak, scores[t]);
  }
  const float total = exp_shifted(scores, span, peak);
  float acc[512];
  for (int64_t i = 0; i < head_dim; ++i) acc[i] = 0.f;
  for (int64_t t = 0; t < span; ++t) {
    const float p = scores[t] / total;
    const float* vt = vbase + t * head_dim;
#pragma omp simd
    for (int64_t i = 0; i < head_dim; ++i) acc[i] += p * vt[i];
  }
  for (int64_t i = 0; i < head_dim; ++i) out[i] = T(acc[i]);
}

// The step's 4-bit product for activations of type T.
template <typename T>
at::Tensor product_q4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale_offsets,
                      int64_t group, const LoraTerms* lora) {
  if constexpr (std::is_same_v<T, bf16>) {
#ifdef LORACORD_VNNI
    return linear_q4_as<VnniProducts>("linear_q4", x, qweight, scale_offsets, group, lora);
#endif
  } else {
#ifdef LORACORD_AVX2
    return linear_q4_as<Avx2Products>("linear_q4_avx2", x, qweight, scale_offsets, group, lora);
#endif
  }
  TORCH_CHECK(false, "decode_layers: this build has no 4-bit product for these activations");
  return x;
}

template <typename T>
at::Tensor decode_layers_as(at::Tensor hidden, const std::vector<at::Tensor>& norms,
                            const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& offsets,
                            const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                            const at::Tensor& cos, const at::Tensor& sin, const std::vector<int64_t>& rows,
                            const std::vector<int64_t>& positions, int64_t heads, int64_t kv_heads,
                            int64_t head_dim, double eps, int64_t group,
                            const std::vector<at::Tensor>& lora_a, const std::vector<at::Tensor>& lora_b,
                            const std::vector<int64_t>& slots, const std::vector<int64_t>& ranks) {
  const int64_t n = hidden.size(0), d = hidden.size(1);
  const int64_t layers = static_cast<int64_t>(keys.size());
  const bool lora = !slots.empty();
  LoraTerms qkv_lora, o_lora;  // q, k and v's terms in qkv's outputs; o's
  for (LoraTerms* terms : {&qkv_lora, &o_lora}) {
    terms->slots = &slots;
    terms->ranks = &ranks;
    terms->max_rank = lora ? lora_a[0].size(1) : 0;
  }
  const int64_t groups = heads / kv_heads, half = head_dim / 2;
  const int64_t q_width = heads * head_dim, k_width = kv_heads * head_dim;
  const float scaling = 1.f / std::sqrt(static_cast<float>(head_dim));
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  hidden = hidden.contiguous().clone();
  std::vector<float> qk((heads + kv_heads) * head_dim);
  at::Tensor attention = at::empty({n, q_width}, hidden.options());
  auto product = [&](const at::Tensor& x, int64_t l, int64_t which, const LoraTerms* terms) -> at::Tensor {
    return product_q4<T>(x, matrices[4 * l + which], offsets[4 * l + which], group, terms);
  };
  auto part = [&](int64_t i, int64_t offset) {
    return LoraPart{lora_a[i].data_ptr<float>(), lora_b[i].data_ptr<float>(), offset, lora_b[i].size(2)};
  };
  for (int64_t l = 0; l < layers; ++l) {
    at::Tensor x = rms_norm<T>(hidden, norms[2 * l], eps);
    if (lora) {
      qkv_lora.parts = {part(4 * l, 0), part(4 * l + 1, q_width), part(4 * l + 2, q_width + k_width)};
      qkv_lora.shrink<T>(x.data_ptr<T>(), n, d);
    }
    at::Tensor qkv = product(x, l, 0, lora ? &qkv_lora : nullptr);
    const int64_t width = qkv.size(1);
    TORCH_CHECK(width == q_width + 2 * k_width, "decode_layers: q, k and v's outputs");
    const T* qkvp = qkv.data_ptr<T>();
    float* kp = keys[l].data_ptr<float>();
    float* vp = values[l].data_ptr<float>();
    const int64_t context = keys[l].size(2);
    const int64_t row_stride = kv_heads * context * head_dim;
    T* ap = attention.data_ptr<T>();
    for (int64_t r = 0; r < n; ++r) {
      const T* src = qkvp + r * width;
      const T* c = cp + r * head_dim;
      const T* s = sp + r * head_dim;
      // rotate q and k together, rounding to T where the eager step's operations do (x * cos,
      // roll(x) * sin, their sum), so in bf16 both steps give the same bits here
      for (int64_t h = 0; h < heads + kv_heads; ++h) {
        for (int64_t i = 0; i < head_dim; ++i) {
          const float v = static_cast<float>(src[h * head_dim + i]);
          const float rolled = static_cast<float>(src[h * head_dim + (i + half) % head_dim]);
          const float a = rounded<T>(v * static_cast<float>(c[i]));
          const float b = rounded<T>(rolled * static_cast<float>(s[i]));
          qk[h * head_dim + i] = rounded<T>(a + b);
        }
      }
      const int64_t row = rows[r], pos = positions[r];
      float* krow = kp + row * row_stride;
      float* vrow = vp + row * row_stride;
      for (int64_t g = 0; g < kv_heads; ++g) {
        float* kdst = krow + (g * context + pos) * head_dim;
        float* vdst = vrow + (g * context + pos) * head_dim;
        for (int64_t i = 0; i < head_dim; ++i) {
          kdst[i] = qk[(heads + g) * head_dim + i];
          vdst[i] = static_cast<float>(src[q_width + k_width + g * head_dim + i]);
        }
      }
      const int64_t span = pos + 1;
      // Heads split between threads once the cache is long enough to pay for the split.
      at::parallel_for(0, heads, span * heads >= 512 ? 1 : heads, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> scores;
        scores.resize(span);
        for (int64_t h = begin; h < end; ++h) {
          const int64_t g = h / groups;
          attend_head<T>(qk.data() + h * head_dim, krow + g * context * head_dim,
                         vrow + g * context * head_dim, span, head_dim, scaling, scores.data(),
                         ap + r * q_width + h * head_dim);
        }
      });
    }
    if (lora) {
      o_lora.parts = {part(4 * l + 3, 0)};
      o_lora.shrink<T>(attention.data_ptr<T>(), n, q_width);
    }
    at::Tensor o = product(attention, l, 1, lora ? &o_lora : nullptr);
    TORCH_CHECK(o.size(1) == d, "decode_layers: o's outputs");
    T* hp = hidden.data_ptr<T>();
    add_into<T>(hp, o.data_ptr<T>(), n * d);
    at::Tensor x2 = rms_norm<T>(hidden, norms[2 * l + 1], eps);
    at::Tensor gu = product(x2, l, 2, nullptr);
    const int64_t inner = gu.size(1) / 2;
    at::Tensor act = at::empty({n, inner}, hidden.options());
    const T* gp = gu.data_ptr<T>();
    T* actp = act.data_ptr<T>();
    for (int64_t r = 0; r < n; ++r) {
      silu_mul<T>(gp + r * 2 * inner, gp + r * 2 * inner + inner, actp + r * inner, inner);
    }
    at::Tensor down = product(act, l, 3, nullptr);
    TORCH_CHECK(down.size(1) == d, "decode_layers: down's outputs");
    add_into<T>(hp, down.data_ptr<T>(), n * d);
  }
  return hidden;
}

}  // namespace

// hidden [n, d] (the embedded tokens), bf16 or fp32, updated through every layer and returned.
// norms: the two RMSNorm weights per layer, in the activations' dtype. matrices and offsets: the
// 4-bit codes and the fp16 scales and offsets of qkv, o, gate_up and down per layer, in the
// layout of the activations' product (`linear_q4` for bf16, `linear_q4_avx2` for fp32).
// keys/values: per layer [rows, kv_heads, context, head_dim] fp32. cos/sin: [n, head_dim] in the
// activations' dtype, sin with its first half negated (x*cos + roll(x, half)*sin is the rotation).
at::Tensor decode_layers(at::Tensor hidden, const std::vector<at::Tensor>& norms,
                         const std::vector<at::Tensor>& matrices, const std::vector<at::Tensor>& offsets,
                         const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                         const at::Tensor& cos, const at::Tensor& sin, const std::vector<int64_t>& rows,
                         const std::vector<int64_t>& positions, int64_t heads, int64_t kv_heads,
                         int64_t head_dim, double eps, int64_t group,
                         const std::vector<at::Tensor>& lora_a, const std::vector<at::Tensor>& lora_b,
                         const std::vector<int64_t>& slots, const std::vector<int64_t>& ranks) {
  at::NoGradGuard no_grad;
  const auto dtype = hidden.scalar_type();
  const int64_t n = hidden.size(0);
  const int64_t layers = static_cast<int64_t>(keys.size());
  // What the loops below index without checking: refuse anything else here, once.
  TORCH_CHECK(hidden.dim() == 2 && (dtype == at::kBFloat16 || dtype == at::kFloat) &&
                  cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "decode_layers: bf16 or fp32 activations, the rotation in the same dtype");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * layers &&
                  static_cast<int64_t>(values.size()) == layers, "decode_layers: norms per layer");
  for (const auto& w : norms) {
    TORCH_CHECK(w.scalar_type() == dtype && w.is_contiguous() && w.dim() == 1 && w.size(0) == hidden.size(1),
                "decode_layers: norm weights [hidden] in the activations' dtype");
  }
  TORCH_CHECK(static_cast<int64_t>(matrices.size()) == 4 * layers &&
                  static_cast<int64_t>(offsets.size()) == 4 * layers,
              "decode_layers: offsets of qkv, o, gate_up, down per layer");
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == n && static_cast<int64_t>(positions.size()) == n &&
                  cos.size(0) == n && sin.size(0) == n && cos.size(1) == head_dim && sin.size(1) == head_dim,
              "decode_layers: one row, position and rotation per token");
  TORCH_CHECK(head_dim <= 512 && head_dim % 2 == 0 && kv_heads > 0 && heads % kv_heads == 0,
              "decode_layers: head layout");
  // LoRA (q, k, v, o of every layer) when any token is on a slot; none otherwise.
  if (!slots.empty()) {
    TORCH_CHECK(static_cast<int64_t>(slots.size()) == n &&
                    static_cast<int64_t>(lora_a.size()) == 4 * layers &&
                    static_cast<int64_t>(lora_b.size()) == 4 * layers,
                "decode_layers: A and B.T of q, k, v, o per layer, a slot per token");
    const int64_t d = hidden.size(1), q_width = heads * head_dim, k_width = kv_heads * head_dim;
    for (int64_t i = 0; i < 4 * layers; ++i) {
      const int64_t in = i % 4 == 3 ? q_width : d;
      const int64_t out = i % 4 == 0 ? q_width : i % 4 == 3 ? d : k_width;
      TORCH_CHECK(lora_a[i].scalar_type() == at::kFloat && lora_b[i].scalar_type() == at::kFloat &&
                      lora_a[i].is_contiguous() && lora_b[i].is_contiguous() && lora_a[i].dim() == 3 &&
                      lora_b[i].dim() == 3 && lora_a[i].sizes().slice(0, 2) == lora_a[0].sizes().slice(0, 2) &&
                      lora_b[i].sizes().slice(0, 2) == lora_a[0].sizes().slice(0, 2) &&
                      lora_a[i].size(2) == in && lora_b[i].size(2) == out,
                  "decode_layers: fp32 LoRA slots [slots + 1, rank, in|out] of q, k, v and o");
    }
    TORCH_CHECK(static_cast<int64_t>(ranks.size()) == lora_a[0].size(0),
                "decode_layers: a rank per LoRA slot");
    for (int64_t rank : ranks) {
      TORCH_CHECK(rank >= 0 && rank <= lora_a[0].size(1), "decode_layers: a slot's rank above its rows");
    }
    for (int64_t r = 0; r < n; ++r) {
      TORCH_CHECK(slots[r] >= 0 && slots[r] < lora_a[0].size(0), "decode_layers: slot out of range");
    }
  }
  for (int64_t l = 0; l < layers; ++l) {
    TORCH_CHECK(keys[l].scalar_type() == at::kFloat && values[l].scalar_type() == at::kFloat &&
                    keys[l].is_contiguous() && values[l].is_contiguous() &&
                    keys[l].size(1) == kv_heads && keys[l].size(3) == head_dim &&
                    values[l].sizes() == keys[l].sizes(),
                "decode_layers: fp32 caches [rows, kv_heads, context, head_dim]");
  }
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(rows[r] >= 0 && rows[r] < keys[0].size(0) && positions[r] >= 0 &&
                    positions[r] < keys[0].size(2), "decode_layers: row or position outside the cache");
  }
  if (dtype == at::kBFloat16) {
    return decode_layers_as<bf16>(hidden, norms, matrices, offsets, keys, values, cos, sin, rows, positions,
                                  heads, kv_heads, head_dim, eps, group, lora_a, lora_b, slots, ranks);
  }
  return decode_layers_as<float>(hidden, norms, matrices, offsets, keys, values, cos, sin, rows, positions,
                                 heads, kv_heads, head_dim, eps, group, lora_a, lora_b, slots, ranks);
}

namespace {
#ifdef LORACORD_VNNI
// J vocabulary rows from `j` times R rows of x from `r`: J x R accumulators kept in registers.
template <int J, int R>
static inline void head_block(const int8_t* wp, const int16_t* q, const float* qscale,
                              const float* sp, float* op, int64_t k, int64_t vocab, int64_t j,
                              int64_t r) {
  __m512i acc[J][R];
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) acc[a][b] = _mm512_setzero_si512();
  for (int64_t c = 0; c < k; c += 32) {
    __m512i x16[R];
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) x16[b] = _mm512_loadu_si512(q + (r + b) * k + c);
#pragma GCC unroll 8
    for (int a = 0; a < J; ++a) {
      const __m512i w16 = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + (j + a) * k + c)));
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) acc[a][b] = _mm512_dpwssd_epi32(acc[a][b], w16, x16[b]);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) {
      // Each lane holds at most k / 16 * 2 * 16383 * 127 (k <= 16384: no overflow); the lanes
      // add up in int64.
      const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[a][b]));
      const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[a][b], 1));
      const int64_t total = _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
      op[(r + b) * vocab + j + a] = static_cast<float>(total) * qscale[r + b] * sp[j + a];
    }
}
#endif


#ifdef LORACORD_AVX2
// The AVX2 twin of head_block: vpmaddwd on 16 int16 lanes, each vocabulary row and row of x
// summed in two accumulators (even and odd 16 inputs), so each int32 lane holds at most
// k / 32 * 2 * 16383 * 127 (k <= 16384: no overflow), as head_block's do.
template <int J, int R>
static inline void head_block_avx2(const int8_t* wp, const int16_t* q, const float* qscale,
                                   const float* sp, float* op, int64_t k, int64_t vocab, int64_t j,
                                   int64_t r) {
  __m256i acc[J][R][2];
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) acc[a][b][0] = acc[a][b][1] = _mm256_setzero_si256();
  for (int64_t c = 0; c < k; c += 32) {
#pragma GCC unroll 2
    for (int e = 0; e < 2; ++e) {
      __m256i x16[R];
#pragma GCC unroll 8
      for (int b = 0; b < R; ++b) {
        x16[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (r + b) * k + c + 16 * e));
      }
#pragma GCC unroll 8
      for (int a = 0; a < J; ++a) {
        const __m256i w16 = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp + (j + a) * k + c + 16 * e)));
#pragma GCC unroll 8
        for (int b = 0; b < R; ++b) acc[a][b][e] = _mm256_add_epi32(acc[a][b][e], _mm256_madd_epi16(w16, x16[b]));
      }
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < J; ++a)
#pragma GCC unroll 8
    for (int b = 0; b < R; ++b) {
      __m256i wide = _mm256_setzero_si256();  // the lanes add up in int64
#pragma GCC unroll 2
      for (int e = 0; e < 2; ++e) {
        wide = _mm256_add_epi64(wide, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[a][b][e])));
        wide = _mm256_add_epi64(wide, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[a][b][e], 1)));
      }
      alignas(32) int64_t lanes[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), wide);
      const int64_t total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
      op[(r + b) * vocab + j + a] = static_cast<float>(total) * qscale[r + b] * sp[j + a];
    }
}
#endif

// The LM head, `x @ W.T * scale`, with W int8 `[vocab, k]` (k a multiple of 32) and one fp32
// scale per row: each row of x is quantized to int16 with one scale (its largest value maps to
// 16383, finer than bf16 for every value within 64x of the largest), and the products are
// integer dot products, exact in int32: AVX512-VNNI's vpdpwssd (32 products an instruction) or
// AVX2's vpmaddwd (16), the same sums either way. Reading the int8 matrix is then the whole cost.
// Returns fp32 logits `[n, vocab]` (not rounded to bf16, whose steps of 0.125 at a logit of 20
// make near-ties).
at::Tensor lm_head_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
#if defined(LORACORD_VNNI) || defined(LORACORD_AVX2)
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                  weight.size(1) % 32 == 0 && weight.size(1) <= 16384,
              "lm_head_int8: x [n, k], weight [vocab, k], k % 32 == 0, k <= 16384");
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.is_contiguous() &&
                  scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.size(0) == weight.size(0), "lm_head_int8: int8 weight, fp32 scale per row");
  const int64_t n = x.size(0), k = x.size(1), vocab = weight.size(0);
  auto xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  std::vector<int16_t> q(n * k);
  std::vector<float> qscale(n);
  for (int64_t r = 0; r < n; ++r) {
    float peak = 0.f;
    for (int64_t i = 0; i < k; ++i) peak = std::max(peak, std::abs(xp[r * k + i]));
    const float step = peak / 16383.f;
    const float inv = step > 0.f ? 1.f / step : 0.f;
    for (int64_t i = 0; i < k; ++i) {
      q[r * k + i] = static_cast<int16_t>(std::nearbyint(xp[r * k + i] * inv));
    }
    qscale[r] = step;
  }
  auto out = at::empty({n, vocab}, xf.options());
  float* op = out.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, vocab, 512, [&](int64_t begin, int64_t end) {
    // One row of x: with VNNI two vocabulary rows at a time (independent chains of vpdpwssd).
    // Several rows of x: four at a time per vocabulary row, each weight widened once and used by
    // all four.
    int64_t j = begin;
#ifdef LORACORD_VNNI
#define LORACORD_HEAD(J, R) head_block<J, R>
#else
#define LORACORD_HEAD(J, R) head_block_avx2<J, R>
#endif
    if (n == 1) {
#ifdef LORACORD_VNNI
      for (; j + 2 <= end; j += 2) LORACORD_HEAD(2, 1)(wp, q.data(), qscale.data(), sp, op, k, vocab, j, 0);
#endif
      // (with AVX2 one vocabulary row at a time, its two accumulators, measured 1.6x faster
      // than two rows at a time on the 2-core AVX2 CPU)
      for (; j < end; ++j) LORACORD_HEAD(1, 1)(wp, q.data(), qscale.data(), sp, op, k, vocab, j, 0);
      return;
    }
    for (; j < end; ++j) {
      int64_t r = 0;
      for (; r + 4 <= n; r += 4) LORACORD_HEAD(1, 4)(wp, q.data(), qscale.data(), sp, op, k, vocab, j, r);
      for (; r + 2 <= n; r += 2) LORACORD_HEAD(1, 2)(wp, q.data(), qscale.data(), sp, op, k, vocab, j, r);
      for (; r < n; ++r) LORACORD_HEAD(1, 1)(wp, q.data(), qscale.data(), sp, op, k, vocab, j, r);
    }
#undef LORACORD_HEAD
  });
  return out;
#else
  TORCH_CHECK(false, "lm_head_int8: this build has neither AVX512-VNNI nor AVX2");
  return x;
#endif
}

}  // namespace

bool has_vnni() {
#ifdef LORACORD_VNNI
  return true;
#else
  return false;
#endif
}

bool has_avx2() {
#ifdef LORACORD_AVX2
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_layers", &decode_layers, "every layer of one decode step (CPU, bf16 or fp32, fp32 cache)");
#ifdef LORACORD_VNNI
  m.def("linear_q4", &linear_q4, "x @ W, x bf16, W 4-bit (GPTQModel's AVX512 layout), VNNI products (CPU)");
#endif
#ifdef LORACORD_AVX2
  m.def("linear_q4_avx2", &linear_q4_avx2, "x @ W, x fp32, W 4-bit (loracord's layout), AVX2 products (CPU)");
#endif
  m.def("lm_head_int8", &lm_head_int8, "x @ W.T * scale: int16 x int8 integer products (CPU)");
  m.def("has_vnni", &has_vnni, "whether the bf16 step's products (linear_q4) are built");
  m.def("has_avx2", &has_avx2, "whether the fp32 step's products (linear_q4_avx2) are built");
}
