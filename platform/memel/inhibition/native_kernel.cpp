// Fused single-pass CPU kernel for memel's inhibition hot path (see native.py and
// kernels.eager_measure, which defines the semantics this file must match).
//
// One read of the [S, N] values computes, per neuron (column), the sums of d = x - mean and
// d^2 (double accumulators), the max of scaled = |d * scale| and the count of scaled >
// threshold, and, per sample (row), the indices of its top_n largest scaled values; the
// copy of the values (same dtype) is written in the same pass when requested.
//
// Threshold selection (select_threshold >= 0) replaces the per-row top-n: every value whose
// scaled >= select_threshold (keys compared, so NaN counts as above) is selected, and the
// result is the flat indices of those values in row-major order (each task appends its hits
// branch-free; a stable counting sort by row restores row-major order when the work split
// produced another).
//
// Ranking uses the IEEE bit pattern of scaled as an int32 key: scaled is |.|, so its sign
// bit is clear and the integer order of the bits is the float order, with every NaN above
// +inf (NaN ranks highest, as in torch.topk / argmax). Per-column max is taken on the same
// keys, so a NaN in a column makes its max NaN (like torch.amax).
//
// Work split: a task owns a block of rows x a range of columns. Row-parallel (each thread
// a block of rows, all columns) when there are many rows; its per-column partial sums are
// merged at the end in a fixed order (deterministic). Column-parallel (each thread a range
// of columns, all rows) otherwise; each (task, row) keeps a partial top-n, merged at the
// end. Inside a task the columns are walked in tiles of TILE so that the tile's column
// accumulators stay in L1 while the task's rows stream through.
//
// Input dtypes: float32, bfloat16 and float16 are read natively (converted to float32 per
// value, exactly like values.float()); the copy keeps the input dtype.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define MEMEL_HAVE_AVX512_PATH 1
#endif

namespace {

constexpr int64_t TILE = 1024;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MEMEL_NO_CLONES)
#define MEMEL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEMEL_CLONES
#endif

// The hot templates are force-inlined into each clone so that every clone gets its own code.
#if defined(__GNUC__)
#define MEMEL_INLINE inline __attribute__((always_inline))
#else
#define MEMEL_INLINE inline
#endif

template <typename T>
MEMEL_INLINE float to_float(T v) {
  return static_cast<float>(v);
}

template <>
MEMEL_INLINE float to_float<c10::BFloat16>(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

MEMEL_INLINE int32_t key_of(float s) {
  int32_t k;
  std::memcpy(&k, &s, sizeof(k));
  return k;
}

MEMEL_INLINE float float_bits(int32_t k) {
  float f;
  std::memcpy(&f, &k, sizeof(f));
  return f;
}

// The MS scale of the hot path, 1/sqrt(var + comp) floored like inverse_sqrt_denominator in
// statistics.py (float32 add, clamp to the smallest normal, then 1/sqrt: torch's rsqrt).
MEMEL_INLINE float ms_scale(float var, float comp) {
  return 1.0f / std::sqrt(std::max(var + comp, std::numeric_limits<float>::min()));
}

// Per-neuron bookkeeping folded into the pass (measure_fold): what record_moments and then
// merge_moments do with one call's sums, done for a column as soon as its sums are complete,
// so that no per-neuron intermediate (sums, pending moments) is written and read back.
// Uniform increments (count, samples behind the mean MS, samples tracked) are left to the
// caller, which adds them lazily; the fold only writes a neuron's deficit where a non-finite
// value made it skip the call. `capped`: the history weighs forget_steps batches of this size.
struct Fold {
  float* mean;        // history mean (in place; the pre-call value is kept in prev_mean)
  float* var;         // history variance (in place)
  int64_t* count;     // history count minus lazily added samples (in place: deficits only)
  int64_t count_offset;
  bool capped;
  bool all_counted;   // every neuron's history has a count (so a capped one weighs the same)
  double forget_steps;
  double samples;     // b: this call's samples
  double* ms_sum;     // window rows (float64, in place)
  double* ms_n;
  double* above;
  double* ms_max;
  float* prev_mean;   // out: the mean each value was judged against
  double* block_var;  // out: sum of the new var per block of 64 neurons
  int64_t* block_merged;  // out: neurons merged per block of 64
};

// Fold one tile of columns [t0, t0 + w) given their sums (sd, sd2: double accumulators of
// d and d^2; mx: max keys; ab: counts above the threshold; sc: the scale each was judged
// with). Written as straight-line selects so that it vectorises: every value is computed for
// every column and the finite ones kept; the rare neurons that skip the call (a non-finite
// value) get their deficits in a scalar loop afterwards. UNIFORM: the history is capped and
// every neuron has a count, so every history weighs forget_steps * b and count is not read.
// The merge is merge_moments' arithmetic, operation for operation (with -ffp-contract=off
// the results are the same bits).
template <bool TRACK, bool UNIFORM>
MEMEL_INLINE void fold_tile(const Fold& f, int64_t t0, int64_t w, const double* __restrict sd,
                            const double* __restrict sd2, const int32_t* __restrict mx, const int32_t* __restrict ab,
                            const float* __restrict sc) {
  const double b = f.samples;
  float* __restrict mean = f.mean + t0;
  float* __restrict var = f.var + t0;
  float* __restrict prev = f.prev_mean + t0;
  const int64_t* __restrict count = f.count + t0;
  double* __restrict ms_sum = f.ms_sum + t0;
  double* __restrict above = f.above + t0;
  double* __restrict ms_max = f.ms_max + t0;
  const double capped_m = f.forget_steps * b;
  const double first_dof = std::max(b - 1, 1.0);
  int64_t skipped = 0;
  for (int64_t j = 0; j < w; ++j) {
    const float d1 = static_cast<float>(sd[j]), d2 = static_cast<float>(sd2[j]);  // as measure's outputs
    const bool finite2 = std::isfinite(d2);
    const bool ok = finite2 & std::isfinite(d1);  // (bitwise: no branch, so the loop vectorises)
    skipped += ok ? 0 : 1;
    if (TRACK) {
      above[j] += static_cast<double>(ab[j]);
      const double m = static_cast<double>(float_bits(mx[j]));
      double sq = m * m;
      sq = std::isnan(sq) ? 0.0 : sq;
      sq = std::isinf(sq) ? std::numeric_limits<double>::max() : sq;
      const double old = ms_max[j];
      ms_max[j] = ((sq > old) | std::isnan(old)) ? sq : old;
    }
    const double scale_j = static_cast<double>(sc[j]);
    const double add = static_cast<double>(finite2 ? d2 : 0.0f) * (scale_j * scale_j);
    ms_sum[j] = finite2 ? ms_sum[j] + add : ms_sum[j];
    const float mu_f = mean[j];
    const float nu_f = var[j];
    prev[j] = mu_f;
    const double mu = static_cast<double>(mu_f);
    const double nu = static_cast<double>(nu_f);
    const double s1 = ok ? static_cast<double>(d1) : 0.0, s2 = ok ? static_cast<double>(d2) : 0.0;
    const double delta = s1 / b;
    const double mean_b = mu + delta;
    const double m2 = std::max(s2 - s1 * delta, 0.0);
    double m;
    if (UNIFORM) {
      m = capped_m;
    } else {
      m = static_cast<double>(count[j] + f.count_offset);
      if (f.capped && m > 0) m = capped_m;
    }
    const double total = m + b;
    const double dof = std::max(total - 1, 1.0);
    const double dm = mu - mean_b;
    double out_mu = (m * mu + b * mean_b) / total;
    double out_nu = m * b * dm * dm / (dof * total) + (m2 + (m - 1) * nu) / dof;
    if (!UNIFORM) {
      out_mu = m == 0 ? mean_b : out_mu;
      out_nu = m == 0 ? m2 / first_dof : out_nu;
    }
    mean[j] = ok ? static_cast<float>(out_mu) : mu_f;
    var[j] = ok ? static_cast<float>(std::max(out_nu, 0.0)) : nu_f;
  }
  if (skipped > 0) {  // deficits of the neurons that skip this call (the caller adds b to all)
    for (int64_t j = 0; j < w; ++j) {
      const float d1 = static_cast<float>(sd[j]), d2 = static_cast<float>(sd2[j]);
      if (!std::isfinite(d2)) f.ms_n[t0 + j] -= b;
      if (!(std::isfinite(d2) && std::isfinite(d1))) f.count[t0 + j] -= static_cast<int64_t>(b);
    }
  }
  // the new var summed per block of 64 in a fixed order (8 lanes, then the lanes in order)
  for (int64_t k = 0; k < w; k += 64) {
    const int64_t e = std::min<int64_t>(64, w - k);
    double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= e; i += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(var[k + i + l]);
    }
    for (; i < e; ++i) lanes[0] += static_cast<double>(var[k + i]);
    f.block_var[(t0 + k) >> 6] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
  f.block_merged[t0 >> 6] += w - skipped;
}

template <bool TRACK>
MEMEL_INLINE void fold_columns(const Fold& f, int64_t t0, int64_t w, const double* sd, const double* sd2,
                               const int32_t* mx, const int32_t* ab, const float* sc) {
  if (f.capped && f.all_counted) fold_tile<TRACK, true>(f, t0, w, sd, sd2, mx, ab, sc);
  else fold_tile<TRACK, false>(f, t0, w, sd, sd2, mx, ab, sc);
}

// A selection candidate: key in the high half, neuron index in the low half, so that integer
// order is key order (ties: either).
MEMEL_INLINE uint64_t pack(int32_t key, int64_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key)) << 32) | static_cast<uint32_t>(index);
}

MEMEL_INLINE int32_t key_part(uint64_t packed) { return static_cast<int32_t>(packed >> 32); }

// One task's threshold hits: flat indices in the order found (tile by tile, row by row) and
// the (row, length) of each row-tile segment of them, to put them in row-major order later.
struct Hits {
  std::vector<int64_t> index;
  int64_t count = 0;
  std::vector<int64_t> segments;
};

struct TaskArgs {
  int64_t N;
  int64_t r0, r1, c0, c1;
  float thr;
  int64_t n;
  // per-row selection state of this task (row r at r - r0): up to n kept candidates
  // (unordered), how many, and the key a value must exceed to enter (-1 until n are kept)
  uint64_t* kept;
  int32_t* count;
  int32_t* tau;
  // threshold selection: key a value must reach (-1: top-n selection), this task's hits
  int32_t select_key;
  Hits* hits;
  // column results: either final outputs (direct) or this task's partial buffers
  bool direct;
  float* out_sd;
  float* out_sd2;
  float* out_max;
  int32_t* out_above;
  double* part_sd;
  double* part_sd2;
  int32_t* part_max;
  int32_t* part_above;
  // the scale from the history variance (var != nullptr) instead of a precomputed one, and
  // the fold (measure_fold; applied at the end of each tile on the direct path)
  const float* var;
  float comp;
  const Fold* fold;
};

// KEYS: store every value's key (threshold selection reads them all); top-n selection needs
// them only for the rare tile whose max can enter the selection (tile_keys recomputes them).
template <typename T, bool TRACK, bool COPY, bool KEYS>
MEMEL_INLINE int32_t row_tile(const T* __restrict xp, T* __restrict op, const float* __restrict m, const float* __restrict sc,
                        int64_t w, float thr, double* __restrict sd, double* __restrict sd2, int32_t* __restrict mx,
                        int32_t* __restrict ab, int32_t* __restrict keys) {
  int32_t kmax = -1;
  for (int64_t j = 0; j < w; ++j) {
    const float v = to_float<T>(xp[j]);
    const float d = v - m[j];
    const float s = std::fabs(d * sc[j]);
    const double dd = static_cast<double>(d);
    sd[j] += dd;
    sd2[j] += dd * dd;
    const int32_t k = key_of(s);
    if (KEYS) keys[j] = k;
    kmax = std::max(kmax, k);
    if (TRACK) {
      mx[j] = std::max(mx[j], k);
      ab[j] += (s > thr) ? 1 : 0;
    }
    if (COPY) op[j] = xp[j];
  }
  return kmax;
}

// The keys of one row's tile, exactly as row_tile computes them.
template <typename T>
MEMEL_INLINE void tile_keys(const T* __restrict xp, const float* __restrict m, const float* __restrict sc, int64_t w,
                            int32_t* __restrict keys) {
  for (int64_t j = 0; j < w; ++j) keys[j] = key_of(std::fabs((to_float<T>(xp[j]) - m[j]) * sc[j]));
}

constexpr int64_t GROUP = 32;

// Keep the n largest of buf[0, m) in buf[0, n) (linear: nth_element); returns the new tau.
MEMEL_INLINE int32_t keep_largest(uint64_t* buf, int64_t m, int64_t n) {
  std::nth_element(buf, buf + (n - 1), buf + m, std::greater<uint64_t>());
  return key_part(buf[n - 1]);
}

// Capacity of the candidate buffer of offer_tile for a given n.
MEMEL_INLINE int64_t buffer_size(int64_t n) { return 2 * n + 64 + GROUP; }

// Offer one row's tile of keys (whose max is kmax > tau) to the row's selection. n == 1:
// the first index of the max (like argmax). n > 1: values above tau are appended branch-free
// to the kept ones (groups of GROUP whose max cannot enter are skipped with one vector
// compare); whenever the buffer passes 2n + 64 entries, only the n largest are kept
// (nth_element) and tau rises to the smallest of them. Linear in the tile and the candidates.
MEMEL_INLINE void offer_tile(const int32_t* __restrict keys, int64_t w, int64_t t0, int32_t kmax, uint64_t* kept,
                             int32_t& count, int32_t& tau, int64_t n, uint64_t* __restrict buf) {
  if (n == 1) {
    int64_t j = 0;
    while (keys[j] != kmax) ++j;
    kept[0] = pack(kmax, t0 + j);
    count = 1;
    tau = kmax;
    return;
  }
  const int64_t flush_at = 2 * n + 64;
  int64_t m = count;
  std::memcpy(buf, kept, static_cast<size_t>(m) * sizeof(uint64_t));
  int32_t t = tau;
  int32_t gm[TILE / GROUP + 1];
  const int64_t groups = (w + GROUP - 1) / GROUP;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t j = g * GROUP, e = std::min(w, j + GROUP);
    int32_t gmax = -1;
    if (e - j == GROUP) {
      for (int64_t i = 0; i < GROUP; ++i) gmax = std::max(gmax, keys[j + i]);
    } else {
      for (int64_t i = j; i < e; ++i) gmax = std::max(gmax, keys[i]);
    }
    gm[g] = gmax;
  }
  if (count < n && groups >= n) {
    // Not n kept yet (a row's first tile): the n-th largest group max is a lower bound of the
    // n-th largest value (n groups each hold one at least as large), so start from it.
    int32_t tmp[TILE / GROUP + 1];
    std::memcpy(tmp, gm, static_cast<size_t>(groups) * sizeof(int32_t));
    std::nth_element(tmp, tmp + (n - 1), tmp + groups, std::greater<int32_t>());
    t = std::max(t, tmp[n - 1] - 1);  // keys are >= 0: "> key - 1" is ">= key"
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t j = g * GROUP, e = std::min(w, j + GROUP);
    if (gm[g] <= t) continue;
    for (int64_t i = j; i < e; ++i) {
      buf[m] = pack(keys[i], t0 + i);
      m += keys[i] > t ? 1 : 0;
    }
    if (m >= flush_at) {
      t = keep_largest(buf, m, n);
      m = n;
    }
  }
  if (m > n) {
    t = keep_largest(buf, m, n);
    m = n;
  } else if (m == n && count < n) {
    int32_t lo = key_part(buf[0]);
    for (int64_t i = 1; i < m; ++i) lo = std::min(lo, key_part(buf[i]));
    t = lo;
  }
  std::memcpy(kept, buf, static_cast<size_t>(m) * sizeof(uint64_t));
  count = static_cast<int32_t>(m);
  tau = t;
}

// Append the flat index of every key >= key in row r's tile to the task's hits: a vectorised
// pass writes one flag byte per value, then 8 flags at a time are read as a word and only
// the set ones (ctz) are visited: a fraction of a cycle per value plus a few per hit.
MEMEL_INLINE void append_hits(const int32_t* __restrict keys, int64_t w, int64_t r, int64_t base, int32_t key,
                              Hits& hits) {
  int64_t k = hits.count;
  if (static_cast<int64_t>(hits.index.size()) < k + w) {
    hits.index.resize(static_cast<size_t>(std::max<int64_t>(2 * static_cast<int64_t>(hits.index.size()), k + w)));
  }
  alignas(64) uint8_t flags[TILE + 8];
  for (int64_t j = 0; j < w; ++j) flags[j] = keys[j] >= key ? 1 : 0;
  std::memset(flags + w, 0, 8);
  int64_t* __restrict out = hits.index.data();
  const int64_t first = k;
  for (int64_t j = 0; j < w; j += 8) {
    uint64_t word;
    std::memcpy(&word, flags + j, sizeof(word));
    while (word != 0) {
      out[k++] = base + j + (__builtin_ctzll(word) >> 3);
      word &= word - 1;
    }
  }
  if (k > first) {
    hits.segments.push_back(r);
    hits.segments.push_back(k - first);
  }
  hits.count = k;
}

// ---------------------------------------------------------------------------------------
// Register-blocked pass for top-1 and threshold selection (float32, AVX-512): the same arithmetic as row_tile, in the
// same order per column, so the same bits; only the loop order differs. A block of
// BLOCK_ROWS rows is walked 32 columns at a time with that chunk's accumulators (sums of d
// and d^2, max keys, counts above) held in registers across the block's rows, instead of
// being loaded and stored for every value: row_tile is bound by those loads and stores.
// Each row keeps its max key so far and the chunk it was first reached in; at the end of the
// tile, the first column of that max in that chunk is found by recomputing the chunk's keys
// (first index of the max, like argmax). Threshold selection instead compresses each row's
// columns with key >= the threshold's into a per-row list, appended to the task's hits row
// by row at the end of the block (row-major within the tile, as append_hits leaves them).
// Runs where the CPU has AVX-512 (F, DQ, BW, VL); elsewhere, and for other dtypes and top-n
// > 1, row_tile runs.

constexpr int64_t BLOCK_ROWS = 16;
constexpr int64_t CHUNK = 32;

bool g_vector_path = true;  // tests switch it off to compare both paths bit for bit

bool vector_path_available() {
#if defined(MEMEL_HAVE_AVX512_PATH)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return supported && g_vector_path;
#else
  return false;
#endif
}

// Per task: the top-1 state of each row ((row - r0) indexes tau/kept/count) and the chunk a
// row's current max was first seen in during this tile (-1: none new).
struct Top1State {
  int32_t* tau;
  uint64_t* kept;
  int32_t* count;
  int32_t* chunk;
};

// Per task, threshold selection: the key a value must reach, the task's hits, and per row of
// a block the columns found so far (capacity each: the tile width plus a vector's slack).
struct ThresholdState {
  int32_t key;
  Hits* hits;
  int32_t* columns;
  int32_t* found;
  int64_t capacity;
};

#if defined(MEMEL_HAVE_AVX512_PATH)
template <bool TRACK, bool COPY, bool SELECT>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) void blocked_tile(
    const float* __restrict x, float* __restrict out, int64_t N, int64_t r0, int64_t r1, int64_t t0, int64_t w,
    const float* __restrict m, const float* __restrict sc, float thr, double* __restrict sd,
    double* __restrict sd2, int32_t* __restrict mx, int32_t* __restrict ab, const Top1State& st,
    const ThresholdState& th) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 vthr = _mm512_set1_ps(thr);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i none = _mm512_set1_epi32(-1);
  const __m512i select_key = _mm512_set1_epi32(th.key);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t b0 = r0; b0 < r1; b0 += BLOCK_ROWS) {
    const int64_t b1 = std::min(r1, b0 + BLOCK_ROWS);
    if (SELECT) std::fill(th.found, th.found + BLOCK_ROWS, 0);
    for (int64_t c = 0; c < w; c += CHUNK) {
      const int64_t rem = std::min<int64_t>(CHUNK, w - c);
      const __mmask16 k0 = rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
      const __mmask16 k1 = rem >= 32 ? static_cast<__mmask16>(0xFFFF)
                           : rem > 16 ? static_cast<__mmask16>((1u << (rem - 16)) - 1)
                                      : static_cast<__mmask16>(0);
      const __mmask8 q0 = static_cast<__mmask8>(k0), q1 = static_cast<__mmask8>(k0 >> 8);
      const __mmask8 q2 = static_cast<__mmask8>(k1), q3 = static_cast<__mmask8>(k1 >> 8);
      const __m512 m0 = _mm512_maskz_loadu_ps(k0, m + c), m1 = _mm512_maskz_loadu_ps(k1, m + c + 16);
      const __m512 s0 = _mm512_maskz_loadu_ps(k0, sc + c), s1 = _mm512_maskz_loadu_ps(k1, sc + c + 16);
      __m512d a0 = _mm512_maskz_loadu_pd(q0, sd + c), a1 = _mm512_maskz_loadu_pd(q1, sd + c + 8);
      __m512d a2 = _mm512_maskz_loadu_pd(q2, sd + c + 16), a3 = _mm512_maskz_loadu_pd(q3, sd + c + 24);
      __m512d e0 = _mm512_maskz_loadu_pd(q0, sd2 + c), e1 = _mm512_maskz_loadu_pd(q1, sd2 + c + 8);
      __m512d e2 = _mm512_maskz_loadu_pd(q2, sd2 + c + 16), e3 = _mm512_maskz_loadu_pd(q3, sd2 + c + 24);
      __m512i x0 = _mm512_setzero_si512(), x1 = _mm512_setzero_si512();
      __m512i n0 = _mm512_setzero_si512(), n1 = _mm512_setzero_si512();
      if (TRACK) {
        x0 = _mm512_maskz_loadu_epi32(k0, mx + c);
        x1 = _mm512_maskz_loadu_epi32(k1, mx + c + 16);
        n0 = _mm512_maskz_loadu_epi32(k0, ab + c);
        n1 = _mm512_maskz_loadu_epi32(k1, ab + c + 16);
      }
      // Software prefetch of this chunk in the next block's rows (of this task): BLOCK_ROWS
      // streams at once, a page apart, are more than the hardware prefetchers follow, so cold
      // values would otherwise arrive at demand-miss speed (the fold of a [4096, 1024] float32
      // activation not in cache: about 1.1 ms without, 0.8 ms with; nearer or farther
      // targets, or the L2 and L3 hints, measured no better). The last block has none.
      for (int64_t r = b0; r < b1; ++r) {
        const float* xp = x + r * N + t0 + c;
        if (r + BLOCK_ROWS < r1) {
          const float* ahead = xp + BLOCK_ROWS * N;
          _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
        }
        const __m512 v0 = _mm512_maskz_loadu_ps(k0, xp), v1 = _mm512_maskz_loadu_ps(k1, xp + 16);
        if (COPY) {
          float* op = out + r * N + t0 + c;
          _mm512_mask_storeu_ps(op, k0, v0);
          _mm512_mask_storeu_ps(op + 16, k1, v1);
        }
        const __m512 d0 = _mm512_sub_ps(v0, m0), d1 = _mm512_sub_ps(v1, m1);
        const __m512 f0 = _mm512_and_ps(_mm512_mul_ps(d0, s0), absmask);
        const __m512 f1 = _mm512_and_ps(_mm512_mul_ps(d1, s1), absmask);
        const __m512d g0 = _mm512_cvtps_pd(_mm512_castps512_ps256(d0));
        const __m512d g1 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d0, 1));
        const __m512d g2 = _mm512_cvtps_pd(_mm512_castps512_ps256(d1));
        const __m512d g3 = _mm512_cvtps_pd(_mm512_extractf32x8_ps(d1, 1));
        // (term + sum, the operand order GCC gives row_tile: the same NaN where both are NaN)
        a0 = _mm512_add_pd(g0, a0);
        a1 = _mm512_add_pd(g1, a1);
        a2 = _mm512_add_pd(g2, a2);
        a3 = _mm512_add_pd(g3, a3);
        e0 = _mm512_add_pd(_mm512_mul_pd(g0, g0), e0);
        e1 = _mm512_add_pd(_mm512_mul_pd(g1, g1), e1);
        e2 = _mm512_add_pd(_mm512_mul_pd(g2, g2), e2);
        e3 = _mm512_add_pd(_mm512_mul_pd(g3, g3), e3);
        const __m512i y0 = _mm512_mask_mov_epi32(none, k0, _mm512_castps_si512(f0));
        const __m512i y1 = _mm512_mask_mov_epi32(none, k1, _mm512_castps_si512(f1));
        if (TRACK) {
          x0 = _mm512_max_epi32(x0, y0);
          x1 = _mm512_max_epi32(x1, y1);
          n0 = _mm512_mask_add_epi32(n0, _mm512_mask_cmp_ps_mask(k0, f0, vthr, _CMP_GT_OQ), n0, one);
          n1 = _mm512_mask_add_epi32(n1, _mm512_mask_cmp_ps_mask(k1, f1, vthr, _CMP_GT_OQ), n1, one);
        }
        if (SELECT) {  // every key >= select_key, in increasing columns, into the row's list
          const __mmask16 h0 = _mm512_cmpge_epi32_mask(y0, select_key);
          const __mmask16 h1 = _mm512_cmpge_epi32_mask(y1, select_key);
          if ((h0 | h1) != 0) {
            int32_t* list = th.columns + (r - b0) * th.capacity;
            int32_t& found = th.found[r - b0];
            const __m512i col0 = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(c)));
            const __m512i col1 = _mm512_add_epi32(col0, _mm512_set1_epi32(16));
            _mm512_storeu_si512(list + found, _mm512_maskz_compress_epi32(h0, col0));
            found += __builtin_popcount(static_cast<unsigned>(h0));
            _mm512_storeu_si512(list + found, _mm512_maskz_compress_epi32(h1, col1));
            found += __builtin_popcount(static_cast<unsigned>(h1));
          }
        } else {
          const int32_t key = _mm512_reduce_max_epi32(_mm512_max_epi32(y0, y1));
          const int64_t row = r - r0;
          if (key > st.tau[row]) {
            st.tau[row] = key;
            st.chunk[row] = static_cast<int32_t>(c);
          }
        }
      }
      _mm512_mask_storeu_pd(sd + c, q0, a0);
      _mm512_mask_storeu_pd(sd + c + 8, q1, a1);
      _mm512_mask_storeu_pd(sd + c + 16, q2, a2);
      _mm512_mask_storeu_pd(sd + c + 24, q3, a3);
      _mm512_mask_storeu_pd(sd2 + c, q0, e0);
      _mm512_mask_storeu_pd(sd2 + c + 8, q1, e1);
      _mm512_mask_storeu_pd(sd2 + c + 16, q2, e2);
      _mm512_mask_storeu_pd(sd2 + c + 24, q3, e3);
      if (TRACK) {
        _mm512_mask_storeu_epi32(mx + c, k0, x0);
        _mm512_mask_storeu_epi32(mx + c + 16, k1, x1);
        _mm512_mask_storeu_epi32(ab + c, k0, n0);
        _mm512_mask_storeu_epi32(ab + c + 16, k1, n1);
      }
    }
    if (SELECT) {  // the block's hits row by row: row-major within the tile, like append_hits
      Hits& hits = *th.hits;
      for (int64_t r = b0; r < b1; ++r) {
        const int32_t found = th.found[r - b0];
        if (found == 0) continue;
        if (static_cast<int64_t>(hits.index.size()) < hits.count + found) {
          hits.index.resize(static_cast<size_t>(std::max<int64_t>(2 * static_cast<int64_t>(hits.index.size()), hits.count + found)));
        }
        const int32_t* list = th.columns + (r - b0) * th.capacity;
        int64_t* dst = hits.index.data() + hits.count;
        const int64_t base = r * N + t0;
        for (int32_t i = 0; i < found; ++i) dst[i] = base + list[i];
        hits.count += found;
        hits.segments.push_back(r);
        hits.segments.push_back(found);
      }
    }
  }
  if (SELECT) return;
  // where a row's max rose in this tile: its first column (the keys recomputed as row_tile does)
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = r - r0;
    const int32_t c = st.chunk[row];
    if (c < 0) continue;
    st.chunk[row] = -1;
    const float* xp = x + r * N + t0;
    const int64_t e = std::min<int64_t>(w, c + CHUNK);
    int64_t j = c;
    while (j < e - 1 && key_of(std::fabs((xp[j] - m[j]) * sc[j])) != st.tau[row]) ++j;
    st.kept[row] = pack(st.tau[row], t0 + j);
    st.count[row] = 1;
  }
}
#endif

// Whether blocked_tile runs for this task: float32 values, top-1 or threshold selection, a
// capable CPU.
template <typename T>
MEMEL_INLINE bool use_blocked(int64_t n) {
  return std::is_same_v<T, float> && n == 1 && vector_path_available();
}

template <typename T, bool TRACK, bool COPY>
MEMEL_INLINE void call_blocked(const T* x, T* out, int64_t N, int64_t r0, int64_t r1, int64_t t0, int64_t w,
                               const float* m, const float* sc, float thr, double* sd, double* sd2, int32_t* mx,
                               int32_t* ab, const Top1State& st, const ThresholdState& th, bool by_threshold) {
#if defined(MEMEL_HAVE_AVX512_PATH)
  if constexpr (std::is_same_v<T, float>) {
    if (by_threshold) blocked_tile<TRACK, COPY, true>(x, out, N, r0, r1, t0, w, m, sc, thr, sd, sd2, mx, ab, st, th);
    else blocked_tile<TRACK, COPY, false>(x, out, N, r0, r1, t0, w, m, sc, thr, sd, sd2, mx, ab, st, th);
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "memel native kernel: blocked path for an unsupported dtype");
}

template <typename T, bool TRACK, bool COPY>
MEMEL_INLINE void run_task_impl(const T* x, T* out, const float* mean, const float* scale, const TaskArgs& a) {
  alignas(64) double sd[TILE];
  alignas(64) double sd2[TILE];
  alignas(64) int32_t mx[TILE];
  alignas(64) int32_t ab[TILE];
  alignas(64) int32_t keys[TILE];
  alignas(64) float scale_tile[TILE];
  const int64_t N = a.N, n = a.n;
  const bool by_threshold = a.select_key >= 0;
  std::vector<uint64_t> buf(n > 1 && !by_threshold ? static_cast<size_t>(buffer_size(n)) : 0);
  const bool blocked = use_blocked<T>(n);
  std::vector<int32_t> chunk_of_max(blocked && !by_threshold ? static_cast<size_t>(a.r1 - a.r0) : 0, -1);
  const Top1State top1{a.tau, a.kept, a.count, chunk_of_max.data()};
  const int64_t capacity = TILE + 2 * 16;  // (a compressed store writes a whole vector)
  std::vector<int32_t> hit_columns(blocked && by_threshold ? static_cast<size_t>(BLOCK_ROWS * capacity) : 0);
  std::vector<int32_t> hit_found(blocked && by_threshold ? static_cast<size_t>(BLOCK_ROWS) : 0);
  const ThresholdState threshold{a.select_key, a.hits, hit_columns.data(), hit_found.data(), capacity};
  for (int64_t t0 = a.c0; t0 < a.c1; t0 += TILE) {
    const int64_t w = std::min(TILE, a.c1 - t0);
    std::fill(sd, sd + w, 0.0);
    std::fill(sd2, sd2 + w, 0.0);
    std::fill(mx, mx + w, static_cast<int32_t>(0));
    std::fill(ab, ab + w, static_cast<int32_t>(0));
    const float* sc = scale_tile;
    if (a.var != nullptr) {
      for (int64_t j = 0; j < w; ++j) scale_tile[j] = ms_scale(a.var[t0 + j], a.comp);
    } else {
      sc = scale + t0;
    }
    if (blocked) {
      call_blocked<T, TRACK, COPY>(x, out, N, a.r0, a.r1, t0, w, mean + t0, sc, a.thr, sd, sd2, mx, ab, top1, threshold,
                                   by_threshold);
    }
    for (int64_t r = blocked ? a.r1 : a.r0; r < a.r1; ++r) {
      const T* xp = x + r * N + t0;
      T* op = COPY ? out + r * N + t0 : nullptr;
      if (by_threshold) {
        const int32_t kmax = row_tile<T, TRACK, COPY, true>(xp, op, mean + t0, sc, w, a.thr, sd, sd2, mx, ab, keys);
        if (kmax >= a.select_key) append_hits(keys, w, r, r * N + t0, a.select_key, *a.hits);
        continue;
      }
      const int32_t kmax = row_tile<T, TRACK, COPY, false>(xp, op, mean + t0, sc, w, a.thr, sd, sd2, mx, ab, keys);
      const int64_t row = r - a.r0;
      if (kmax > a.tau[row]) {
        tile_keys<T>(xp, mean + t0, sc, w, keys);
        offer_tile(keys, w, t0, kmax, a.kept + row * n, a.count[row], a.tau[row], n, buf.data());
      }
    }
    if (a.direct && a.fold != nullptr) {
      fold_columns<TRACK>(*a.fold, t0, w, sd, sd2, mx, ab, sc);
    } else if (a.direct) {
      for (int64_t j = 0; j < w; ++j) {
        a.out_sd[t0 + j] = static_cast<float>(sd[j]);
        a.out_sd2[t0 + j] = static_cast<float>(sd2[j]);
      }
      if (TRACK) {
        std::memcpy(a.out_max + t0, mx, w * sizeof(int32_t));
        std::memcpy(a.out_above + t0, ab, w * sizeof(int32_t));
      }
    } else {
      std::memcpy(a.part_sd + t0, sd, w * sizeof(double));
      std::memcpy(a.part_sd2 + t0, sd2, w * sizeof(double));
      if (TRACK) {
        std::memcpy(a.part_max + t0, mx, w * sizeof(int32_t));
        std::memcpy(a.part_above + t0, ab, w * sizeof(int32_t));
      }
    }
  }
}

#define MEMEL_DEFINE_TASK(NAME, T)                                                                      \
  MEMEL_CLONES void NAME(const T* x, T* out, const float* mean, const float* scale, const TaskArgs& a, \
                         bool track, bool copy) {                                                       \
    if (track) {                                                                                        \
      if (copy) run_task_impl<T, true, true>(x, out, mean, scale, a);                                  \
      else run_task_impl<T, true, false>(x, out, mean, scale, a);                                      \
    } else {                                                                                            \
      if (copy) run_task_impl<T, false, true>(x, out, mean, scale, a);                                 \
      else run_task_impl<T, false, false>(x, out, mean, scale, a);                                     \
    }                                                                                                   \
  }

MEMEL_DEFINE_TASK(run_task_f32, float)
MEMEL_DEFINE_TASK(run_task_bf16, c10::BFloat16)
MEMEL_DEFINE_TASK(run_task_f16, c10::Half)

inline void run_task(const at::Tensor& values, const at::Tensor& copied, const float* mean, const float* scale,
                     const TaskArgs& a, bool track, bool copy) {
  switch (values.scalar_type()) {
    case at::kFloat:
      run_task_f32(values.const_data_ptr<float>(), copy ? copied.data_ptr<float>() : nullptr, mean, scale, a, track,
                   copy);
      break;
    case at::kBFloat16:
      run_task_bf16(values.const_data_ptr<c10::BFloat16>(), copy ? copied.data_ptr<c10::BFloat16>() : nullptr, mean,
                    scale, a, track, copy);
      break;
    case at::kHalf:
      run_task_f16(values.const_data_ptr<c10::Half>(), copy ? copied.data_ptr<c10::Half>() : nullptr, mean, scale, a,
                   track, copy);
      break;
    default:
      TORCH_CHECK(false, "memel native inhibition kernel: unsupported dtype ", values.scalar_type());
  }
}

// The copy is a fresh [S, N] buffer written once. With MEMEL_NATIVE_HUGEPAGES=1, on Linux,
// large ones are backed by transparent huge pages (2 MiB), so that first touch costs one
// fault per 2 MiB instead of per 4 KiB; off by default, because where the kernel compacts
// memory synchronously for madvised regions (THP defrag "madvise") a fault can stall for
// tens of milliseconds. Otherwise at::empty_like.
at::Tensor empty_copy(const at::Tensor& like) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(like.numel()) * like.element_size();
  static const bool enabled = [] {
    const char* v = std::getenv("MEMEL_NATIVE_HUGEPAGES");  // opt-in: see native.py
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  if (enabled && nbytes >= 2 * kHuge) {
    const size_t bytes = (nbytes + kHuge - 1) & ~(kHuge - 1);
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, bytes) == 0 && p != nullptr) {
      madvise(p, bytes, MADV_HUGEPAGE);  // advisory: ignored where THP is off
      return at::from_blob(p, like.sizes(), [](void* q) { std::free(q); }, like.options());
    }
  }
#endif
  return at::empty_like(like, at::MemoryFormat::Contiguous);
}

// Buffer reuse (a CPU caching allocator for one buffer): the caller keeps the buffer it got
// last time and offers it again; it is reused when nothing but the caller refers to its memory
// any more, else a fresh one is allocated. What is handed out is lent: a tensor over the
// buffer's memory with a storage of its own (so not an autograd view of the buffer) that keeps
// the buffer's storage alive, so while the lent tensor or any view of it lives the buffer's
// storage count stays above one. Reusing skips the page faults of fresh memory, most of the
// cost of writing a new activation-sized tensor on CPU.
bool reusable(const c10::optional<at::Tensor>& buffer, const at::Tensor& like) {
  return buffer.has_value() && buffer->defined() && buffer->storage().use_count() == 1 &&
         buffer->device() == like.device() && buffer->scalar_type() == like.scalar_type() &&
         buffer->sizes() == like.sizes() && buffer->is_contiguous() && buffer->storage_offset() == 0;
}

at::Tensor lend(const at::Tensor& buffer) {
  c10::Storage keep = buffer.storage();
  return at::from_blob(buffer.data_ptr(), buffer.sizes(), buffer.strides(), [keep](void*) {}, buffer.options());
}

}  // namespace

// The flat indices of every task's hits in row-major order. Within a task and row, hits come
// in increasing columns, and tasks sharing a row cover increasing columns, so concatenating in
// task order is row-major unless a task walked several tiles: then the row-tile segments are
// placed by a counting sort on their rows (stable, no per-hit division).
at::Tensor gather_hits(const std::vector<Hits>& hits, int64_t S, const at::TensorOptions& options) {
  int64_t total = 0;
  for (const Hits& h : hits) total += h.count;
  at::Tensor selected = at::empty({total}, options);
  int64_t* out = selected.data_ptr<int64_t>();
  int64_t offset = 0;
  for (const Hits& h : hits) {
    std::memcpy(out + offset, h.index.data(), static_cast<size_t>(h.count) * sizeof(int64_t));
    offset += h.count;
  }
  if (std::is_sorted(out, out + total)) return selected;
  std::vector<int64_t> start(static_cast<size_t>(S) + 1, 0);
  for (const Hits& h : hits) {
    for (size_t i = 0; i < h.segments.size(); i += 2) start[static_cast<size_t>(h.segments[i]) + 1] += h.segments[i + 1];
  }
  for (int64_t r = 0; r < S; ++r) start[r + 1] += start[r];
  for (const Hits& h : hits) {
    const int64_t* src = h.index.data();
    for (size_t i = 0; i < h.segments.size(); i += 2) {
      const int64_t len = h.segments[i + 1];
      int64_t& at = start[static_cast<size_t>(h.segments[i])];
      std::memcpy(out + at, src, static_cast<size_t>(len) * sizeof(int64_t));
      at += len;
      src += len;
    }
  }
  return selected;
}

// Returns (sum_d, sum_d2, max_scaled, above, selected, copy); max_scaled/above/copy are
// undefined tensors (None in Python) when not requested. selected is [S, top_n] neuron
// indices, or with select_threshold >= 0 the 1-D flat indices of the values with
// scaled >= select_threshold (top_n is then unused).
//
// The scale is `scale` (one per neuron) or, when `var` is given, computed per tile from the
// history variance and comp = eps * mean(var). With a fold (measure_fold) the per-neuron
// results are folded into the history instead of returned (their tensors are undefined).
std::vector<at::Tensor> measure_impl(const at::Tensor& values, const float* mp, const float* sp, const float* var,
                                     float comp, int64_t top_n, double sqrt_threshold, bool track, bool copy,
                                     int64_t threads, double select_threshold, const Fold* fold,
                                     const c10::optional<at::Tensor>& reuse = c10::nullopt, bool sorted_rows = false) {
  const int64_t S = values.size(0), N = values.size(1), n = top_n;
  TORCH_CHECK(S > 0 && N > 0, "values must not be empty");
  TORCH_CHECK(n >= 1 && n <= N, "top_n must be in 1..neurons");
  TORCH_CHECK(N < (int64_t(1) << 31), "too many neurons for the native kernel");

  const auto fopts = values.options().dtype(at::kFloat);
  const bool outputs = fold == nullptr;
  at::Tensor sum_d, sum_d2, max_scaled, above;
  if (outputs) {
    sum_d = at::empty({N}, fopts);
    sum_d2 = at::empty({N}, fopts);
  }
  if (track && outputs) {
    max_scaled = at::empty({N}, fopts);
    above = at::empty({N}, values.options().dtype(at::kInt));
  }
  at::Tensor copied;
  if (copy) copied = reusable(reuse, values) ? *reuse : empty_copy(values);
  const bool by_threshold = select_threshold >= 0;  // (NaN: top-n)
  at::Tensor selected;
  if (!by_threshold) selected = at::empty({S, n}, values.options().dtype(at::kLong));

  int64_t T = threads > 0 ? threads : at::get_num_threads();
  if (S * N < (int64_t(1) << 15)) T = 1;  // tiny calls: threads cost more than they save
  T = std::max<int64_t>(T, 1);
  // Row-parallel needs per-thread partial column sums (24 bytes per neuron and thread): use it
  // when rows are plentiful, so that the partials stay small next to the values themselves.
  const bool by_rows = T > 1 && S >= 64 * T;
  int64_t P = 1, C = 1;  // row parts, column parts
  if (by_rows) {
    P = std::min(T, S);
  } else if (T > 1) {
    C = std::max<int64_t>(1, std::min(T, (N + 63) / 64));
  }

  const float thr = static_cast<float>(sqrt_threshold);
  const int32_t select_key = by_threshold ? key_of(static_cast<float>(select_threshold)) : -1;

  // top-n selection state per (column part, row): [C][S][n] kept, [C][S] count and tau
  const int64_t states = by_threshold ? 0 : C * S;
  std::vector<uint64_t> kept(static_cast<size_t>(states * n));
  std::vector<int32_t> count(static_cast<size_t>(states), 0);
  std::vector<int32_t> tau(static_cast<size_t>(states), -1);
  // threshold selection: each task's hits (flat indices) and how many
  std::vector<Hits> hits(by_threshold ? static_cast<size_t>(P * C) : 0);
  std::vector<double> part_sd, part_sd2;
  std::vector<int32_t> part_max, part_above;
  if (P > 1) {
    part_sd.resize(static_cast<size_t>(P * N));
    part_sd2.resize(static_cast<size_t>(P * N));
    if (track) {
      part_max.resize(static_cast<size_t>(P * N));
      part_above.resize(static_cast<size_t>(P * N));
    }
  }

  auto make_task = [&](int64_t t) {
    TaskArgs a{};
    a.N = N;
    a.n = n;
    a.thr = thr;
    a.select_key = select_key;
    if (by_threshold) {
      a.hits = &hits[static_cast<size_t>(t)];
    }
    if (P > 1) {
      const int64_t p = t;
      a.r0 = S * p / P;
      a.r1 = S * (p + 1) / P;
      a.c0 = 0;
      a.c1 = N;
      if (!by_threshold) {
        a.kept = kept.data() + a.r0 * n;
        a.count = count.data() + a.r0;
        a.tau = tau.data() + a.r0;
      }
      a.direct = false;
      a.part_sd = part_sd.data() + p * N;
      a.part_sd2 = part_sd2.data() + p * N;
      a.part_max = track ? part_max.data() + p * N : nullptr;
      a.part_above = track ? part_above.data() + p * N : nullptr;
    } else {
      const int64_t c = t;
      // column ranges aligned to 64 values (whole cache lines for every dtype)
      const int64_t blocks = (N + 63) / 64;
      a.r0 = 0;
      a.r1 = S;
      a.c0 = std::min(N, (blocks * c / C) * 64);
      a.c1 = std::min(N, (blocks * (c + 1) / C) * 64);
      if (!by_threshold) {
        a.kept = kept.data() + c * S * n;
        a.count = count.data() + c * S;
        a.tau = tau.data() + c * S;
      }
      a.direct = true;
    }
    a.out_sd = outputs ? sum_d.data_ptr<float>() : nullptr;
    a.out_sd2 = outputs ? sum_d2.data_ptr<float>() : nullptr;
    a.out_max = track && outputs ? max_scaled.data_ptr<float>() : nullptr;
    a.out_above = track && outputs ? above.data_ptr<int32_t>() : nullptr;
    a.var = var;
    a.comp = comp;
    a.fold = fold;
    return a;
  };

  const int64_t tasks = P * C;
  if (tasks == 1) {
    run_task(values, copied, mp, sp, make_task(0), track, copy);
  } else {
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) run_task(values, copied, mp, sp, make_task(t), track, copy);
    });
  }

  // column j's sums over the row parts, in part order (deterministic)
  auto combine_parts = [&](int64_t j, double& a, double& b, int32_t& mk, int32_t& cnt) {
    a = 0.0;
    b = 0.0;
    mk = 0;
    cnt = 0;
    for (int64_t p = 0; p < P; ++p) {
      a += part_sd[p * N + j];
      b += part_sd2[p * N + j];
      if (track) {
        mk = std::max(mk, part_max[p * N + j]);
        cnt += part_above[p * N + j];
      }
    }
  };

  // merge partial column sums (row-parallel) in a fixed order; with a fold, fold each column
  // (blocks of 64 in parallel: each block's sums are taken in column order, so deterministic)
  if (P > 1 && fold != nullptr) {
    at::parallel_for(0, (N + 63) / 64, 16, [&](int64_t begin, int64_t end) {
      alignas(64) double bsd[64];
      alignas(64) double bsd2[64];
      alignas(64) int32_t bmx[64];
      alignas(64) int32_t bab[64];
      alignas(64) float bsc[64];
      for (int64_t block = begin; block < end; ++block) {
        const int64_t j0 = block * 64, w = std::min<int64_t>(64, N - j0);
        for (int64_t i = 0; i < w; ++i) {
          const int64_t j = j0 + i;
          combine_parts(j, bsd[i], bsd2[i], bmx[i], bab[i]);
          bsc[i] = var != nullptr ? ms_scale(var[j], comp) : sp[j];
        }
        if (track) fold_columns<true>(*fold, j0, w, bsd, bsd2, bmx, bab, bsc);
        else fold_columns<false>(*fold, j0, w, bsd, bsd2, bmx, bab, bsc);
      }
    });
  } else if (P > 1) {
    float* osd = sum_d.data_ptr<float>();
    float* osd2 = sum_d2.data_ptr<float>();
    float* omax = track ? max_scaled.data_ptr<float>() : nullptr;
    int32_t* oab = track ? above.data_ptr<int32_t>() : nullptr;
    for (int64_t j = 0; j < N; ++j) {
      double a, b;
      int32_t mk, cnt;
      combine_parts(j, a, b, mk, cnt);
      osd[j] = static_cast<float>(a);
      osd2[j] = static_cast<float>(b);
      if (track) {
        omax[j] = float_bits(mk);
        oab[j] = cnt;
      }
    }
  }  // (the direct path already wrote the max keys' bits into the float output)

  if (by_threshold) {
    selected = gather_hits(hits, S, values.options().dtype(at::kLong));
    return {sum_d, sum_d2, max_scaled, above, selected, copied};
  }

  // merge the per-(column part, row) selections, then write them (every row keeps n: N >= n)
  int64_t* sel = selected.data_ptr<int64_t>();
  if (C > 1) {
    std::vector<uint64_t> all(static_cast<size_t>(C * n));
    for (int64_t r = 0; r < S; ++r) {
      int64_t m = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k = count[c * S + r];
        std::memcpy(all.data() + m, kept.data() + (c * S + r) * n, static_cast<size_t>(k) * sizeof(uint64_t));
        m += k;
      }
      TORCH_INTERNAL_ASSERT(m >= n);
      if (m > n) {
        // n == 1: the max, the earliest part first on equal keys (argmax's first index)
        if (n == 1) {
          uint64_t best = all[0];
          for (int64_t i = 1; i < m; ++i) {
            if (key_part(all[i]) > key_part(best)) best = all[i];
          }
          all[0] = best;
        } else {
          std::nth_element(all.data(), all.data() + (n - 1), all.data() + m, std::greater<uint64_t>());
        }
      }
      std::memcpy(kept.data() + r * n, all.data(), static_cast<size_t>(n) * sizeof(uint64_t));
    }
  }
  for (int64_t i = 0; i < S * n; ++i) sel[i] = static_cast<int64_t>(static_cast<uint32_t>(kept[static_cast<size_t>(i)]));
  if (sorted_rows && n > 1) {  // each sample's selections in increasing neuron order
    for (int64_t r = 0; r < S; ++r) std::sort(sel + r * n, sel + (r + 1) * n);
  }

  return {sum_d, sum_d2, max_scaled, above, selected, copied};
}

static void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* name);

// Returns (sum_d, sum_d2, max_scaled, above, selected, copy); max_scaled/above/copy are
// undefined tensors (None in Python) when not requested. selected is [S, top_n] neuron
// indices (with sorted_rows in increasing order within each sample), or with
// select_threshold >= 0 the 1-D flat indices of the values with scaled >= select_threshold
// (top_n is then unused).
std::vector<at::Tensor> measure(const at::Tensor& values_in, const at::Tensor& mean_in, const at::Tensor& scale_in,
                                int64_t top_n, double sqrt_threshold, bool track, bool copy, int64_t threads,
                                double select_threshold, bool sorted_rows) {
  TORCH_CHECK(values_in.dim() == 2, "values must be [samples, neurons]");
  TORCH_CHECK(values_in.device().is_cpu(), "values must be on the CPU");
  const at::Tensor values = values_in.contiguous();
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  TORCH_CHECK(mean.numel() == values.size(1) && scale.numel() == values.size(1),
              "mean and scale must have one value per neuron");
  return measure_impl(values, mean.const_data_ptr<float>(), scale.const_data_ptr<float>(), nullptr, 0.0f, top_n,
                      sqrt_threshold, track, copy, threads, select_threshold, nullptr, c10::nullopt, sorted_rows);
}

// Calls f with a value of the C++ type of a supported value dtype (float32, bfloat16,
// float16), or fails naming `what`.
template <typename F>
void with_value_type(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", dtype);
  }
}

// Mode l2e's loss terms of one call (LogMSLoss in kernels.py): with d = z - mean[neuron] for
// the values z at flat_index of the [S, N] values: (sum of log(d^2 + delta) as a float32
// scalar, summed in double; and per value the gradient 2d / (d^2 + delta), float32).
template <typename T>
double log_ms_loop(const T* z, const float* mu, const int64_t* flat, const int64_t* neuron, int64_t K, int64_t total,
                   int64_t N, float delta, float* g) {
  double sum = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(flat[i] >= 0 && flat[i] < total && neuron[i] >= 0 && neuron[i] < N, "log_ms_terms: index out of range");
    const float d = to_float<T>(z[flat[i]]) - mu[neuron[i]];
    const float shifted = d * d + delta;
    sum += static_cast<double>(std::log(shifted));
    g[i] = (2.0f * d) / shifted;
  }
  return sum;
}

// (sum, local) for CPU values of a supported dtype, mu: one float32 mean per neuron.
std::tuple<at::Tensor, at::Tensor> log_ms_terms_of(const at::Tensor& values, const at::Tensor& flat_index,
                                                   const at::Tensor& neuron_index, const float* mu, double delta) {
  const int64_t K = flat_index.numel(), total = values.numel(), N = values.size(1);
  const auto fopts = values.options().dtype(at::kFloat);
  at::Tensor local = at::empty({K}, fopts);
  const int64_t* flat = flat_index.const_data_ptr<int64_t>();
  const int64_t* neuron = neuron_index.const_data_ptr<int64_t>();
  float* g = local.data_ptr<float>();
  const float dl = static_cast<float>(delta);
  double sum = 0.0;
  with_value_type(values.scalar_type(), "log_ms_terms", [&](auto tag) {
    using T = decltype(tag);
    sum = log_ms_loop(values.const_data_ptr<T>(), mu, flat, neuron, K, total, N, dl, g);
  });
  return {at::scalar_tensor(sum, fopts), local};
}

std::tuple<at::Tensor, at::Tensor> log_ms_terms(const at::Tensor& values_in, const at::Tensor& flat_index,
                                                const at::Tensor& neuron_index, const at::Tensor& mean, double delta) {
  TORCH_CHECK(values_in.device().is_cpu() && values_in.dim() == 2, "log_ms_terms: [samples, neurons] CPU values");
  const at::Tensor values = values_in.contiguous();
  TORCH_CHECK(flat_index.scalar_type() == at::kLong && neuron_index.scalar_type() == at::kLong &&
                  neuron_index.numel() == flat_index.numel() && flat_index.is_contiguous() &&
                  neuron_index.is_contiguous(),
              "log_ms_terms: bad indices");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && mean.is_contiguous() && mean.numel() == values.size(1),
              "log_ms_terms: bad mean");
  return log_ms_terms_of(values, flat_index, neuron_index, mean.const_data_ptr<float>(), delta);
}

// One training call measured AND folded into the history in the same pass (the local path
// of module.py: no distributed reduction, one call = one batch): MS against the history
// (scale from var and comp = eps * mean(var)), each sample's selection, the copy, and per
// neuron the window's trackers and the Lemma 3.2 / forget-step merge of the call's moments,
// in place. The pre-call mean of every neuron lands in prev_mean. Uniform increments are
// the caller's (count += samples for every neuron, window ms_n += samples, and tracked +=
// samples on tracked calls), added lazily: the fold subtracts them where a neuron skips the
// call (a non-finite value), and count_offset is what the caller has not added to count yet.
// Each selected value also counts once in the window rows selected_row and inhibited_row
// (-1: none). With delta >= 0 (mode l2e) the selected values' loss terms are computed too,
// against the pre-call mean (log_ms_loop), and each sample's top-n come in increasing neuron
// order, so that the flat indices strictly increase (a coalesced sparse gradient).
// Returns (neuron_index, flat_index, copy, buffer, var_sum, merged, terms, local): every
// selected value's neuron and flat index into [S, N] (row-major), the copy lent from buffer
// (see reusable: offer buffer as `reuse` next time), the sum of the new var and the number
// of neurons merged, and (l2e; else undefined) the sum of the terms and their gradient factors.
// The module's 0-dim int64 counters, where given, are written too (no tensor op of their own
// on the hot path): calls = calls_value, and batches += 1 when any neuron merged the call.
using FoldResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t, at::Tensor, at::Tensor>;

FoldResult measure_fold(const at::Tensor& values_in, at::Tensor mean, at::Tensor var, at::Tensor count,
                        at::Tensor window, at::Tensor prev_mean, double comp, int64_t top_n, double sqrt_threshold,
                        bool track, bool copy, int64_t threads, double select_threshold, bool capped,
                        int64_t forget_steps, int64_t count_offset, bool all_counted, int64_t ms_sum_row,
                        int64_t ms_n_row, int64_t above_row, int64_t max_row, int64_t selected_row,
                        int64_t inhibited_row, const c10::optional<at::Tensor>& reuse, double delta,
                        const c10::optional<at::Tensor>& calls, int64_t calls_value,
                        const c10::optional<at::Tensor>& batches) {
  TORCH_CHECK(values_in.dim() == 2, "values must be [samples, neurons]");
  TORCH_CHECK(values_in.device().is_cpu(), "values must be on the CPU");
  const at::Tensor values = values_in.contiguous();
  const int64_t S = values.size(0), N = values.size(1);
  check_vector(mean, at::kFloat, N, "mean");
  check_vector(var, at::kFloat, N, "var");
  check_vector(count, at::kLong, N, "count");
  check_vector(prev_mean, at::kFloat, N, "prev_mean");
  TORCH_CHECK(window.dim() == 2 && window.size(1) == N, "memel native fold: bad window shape");
  check_vector(window, at::kDouble, window.numel(), "window");
  const int64_t rows = window.size(0);
  TORCH_CHECK(ms_sum_row < rows && ms_n_row < rows && above_row < rows && max_row < rows && selected_row < rows &&
                  inhibited_row < rows,
              "bad window rows");
  for (const auto* counter : {&calls, &batches}) {
    TORCH_CHECK(!counter->has_value() || ((*counter)->device().is_cpu() && (*counter)->scalar_type() == at::kLong &&
                                          (*counter)->numel() == 1),
                "memel native fold: a counter must be a one-element int64 CPU tensor");
  }
  const int64_t blocks = (N + 63) / 64;
  std::vector<double> block_var(static_cast<size_t>(blocks), 0.0);
  std::vector<int64_t> block_merged(static_cast<size_t>(blocks), 0);
  double* w = window.data_ptr<double>();
  Fold fold{};
  fold.mean = mean.data_ptr<float>();
  fold.var = var.data_ptr<float>();
  fold.count = count.data_ptr<int64_t>();
  fold.count_offset = count_offset;
  fold.capped = capped;
  fold.all_counted = all_counted;
  fold.forget_steps = static_cast<double>(forget_steps);
  fold.samples = static_cast<double>(S);
  fold.ms_sum = w + ms_sum_row * N;
  fold.ms_n = w + ms_n_row * N;
  fold.above = w + above_row * N;
  fold.ms_max = w + max_row * N;
  fold.prev_mean = prev_mean.data_ptr<float>();
  fold.block_var = block_var.data();
  fold.block_merged = block_merged.data();
  const bool l2e = delta >= 0;
  std::vector<at::Tensor> out =
      measure_impl(values, fold.mean, nullptr, fold.var, static_cast<float>(comp), top_n, sqrt_threshold, track, copy,
                   threads, select_threshold, &fold, reuse, l2e);
  double var_sum = 0.0;
  int64_t merged = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    var_sum += block_var[static_cast<size_t>(k)];
    merged += block_merged[static_cast<size_t>(k)];
  }
  // every selected value as (neuron, flat index into [S, N]), in the order selected, and the
  // window's times selected (and inhibited) += 1 per value: a serial loop, so no races
  const at::Tensor selected = out[4];
  const int64_t K = selected.numel();
  at::Tensor neuron_index, flat_index;
  if (select_threshold >= 0) {  // flat indices, row-major
    flat_index = selected;
    neuron_index = at::empty({K}, selected.options());
    const int64_t* f = flat_index.const_data_ptr<int64_t>();
    int64_t* o = neuron_index.data_ptr<int64_t>();
    for (int64_t i = 0; i < K; ++i) o[i] = f[i] % N;
  } else {  // [S, top_n] neuron indices
    neuron_index = selected.reshape({-1});
    flat_index = at::empty({K}, selected.options());
    const int64_t* c = neuron_index.const_data_ptr<int64_t>();
    int64_t* o = flat_index.data_ptr<int64_t>();
    for (int64_t r = 0, i = 0; r < S; ++r) {
      for (int64_t k = 0; k < top_n; ++k, ++i) o[i] = r * N + c[i];
    }
  }
  const int64_t* neurons = neuron_index.const_data_ptr<int64_t>();
  for (const int64_t row : {selected_row, inhibited_row}) {
    if (row < 0) continue;
    double* counts = w + row * N;
    for (int64_t i = 0; i < K; ++i) counts[neurons[i]] += 1.0;
  }
  at::Tensor terms, local;
  if (l2e) std::tie(terms, local) = log_ms_terms_of(values, flat_index, neuron_index, fold.prev_mean, delta);
  if (calls.has_value()) *calls->data_ptr<int64_t>() = calls_value;
  if (batches.has_value() && merged > 0) *batches->data_ptr<int64_t>() += 1;
  return {neuron_index, flat_index, copy ? lend(out[5]) : out[5], out[5], var_sum, merged, terms, local};
}

// The gradient of Reverse Deactivation: a copy of grad with the values at flat_index multiplied
// by -strength, written into a reused buffer when it is free (see reusable). Returns (the
// gradient lent, its buffer to offer next time).
std::vector<at::Tensor> reversed_gradient(const at::Tensor& grad_in, const at::Tensor& flat_index, double strength,
                                          const c10::optional<at::Tensor>& reuse) {
  TORCH_CHECK(grad_in.device().is_cpu() && flat_index.device().is_cpu(), "reversed_gradient: CPU tensors only");
  TORCH_CHECK(flat_index.scalar_type() == at::kLong && flat_index.dim() == 1, "reversed_gradient: bad index");
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = reusable(reuse, grad) ? *reuse : empty_copy(grad);
  const int64_t bytes = grad.numel() * static_cast<int64_t>(grad.element_size());
  const char* src = static_cast<const char*>(grad.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, bytes, int64_t(1) << 20, [&](int64_t begin, int64_t end) {
    std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin));
  });
  const at::Tensor flat = out.view(-1);
  if (flat_index.numel() > 0) {  // (index_select checks the indices)
    const at::Tensor picked = flat.index_select(0, flat_index);
    flat.index_copy_(0, flat_index, strength == 0.0 ? at::zeros_like(picked) : picked.mul(-strength));
  }
  return {lend(out), out};
}

// Reverse Deactivation's gradient in place: grad[flat_index] *= -strength (0 when strength
// is 0), rounded to grad's dtype like reversed_gradient's copy. For a gradient that
// gradient_ownership found autograd alone holds: no copy of it.
template <typename T>
void reverse_loop(T* g, const int64_t* flat, int64_t K, int64_t total, float factor, bool zero) {
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(flat[i] >= 0 && flat[i] < total, "reverse_selected_: index out of range");
    g[flat[i]] = zero ? static_cast<T>(0.0f) : static_cast<T>(static_cast<float>(g[flat[i]]) * factor);
  }
}

void reverse_selected_(at::Tensor grad, const at::Tensor& flat_index, double strength) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "reverse_selected_: not while recording a graph");
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.layout() == at::kStrided,
              "reverse_selected_: a contiguous CPU gradient");
  TORCH_CHECK(flat_index.scalar_type() == at::kLong && flat_index.is_contiguous() && flat_index.dim() == 1,
              "reverse_selected_: bad indices");
  const int64_t K = flat_index.numel(), total = grad.numel();
  const int64_t* flat = flat_index.const_data_ptr<int64_t>();
  const float factor = static_cast<float>(-strength);
  const bool zero = strength == 0.0;
  with_value_type(grad.scalar_type(), "reverse_selected_", [&](auto tag) {
    reverse_loop(grad.data_ptr<decltype(tag)>(), flat, K, total, factor, zero);
  });
}

// Mode l2e's gradient for one call (LogMSLoss.backward): local * grad_terms at the flat
// (row-major) indices of a contiguous tensor of `sizes`, as a sparse COO tensor of `dtype`.
// When the indices strictly increase (every native selection of l2e: one value per flat
// index, row-major) the tensor is marked coalesced, which lets autograd add it into the
// dense gradient in O(K) (an uncoalesced one costs about 10x more); otherwise it is sorted
// first, and marked coalesced if the indices then turn out unique. The COO indices come from
// one float64 multiplication per dimension, corrected to the exact quotient (no integer
// division: indices < 2^53).
at::Tensor sparse_gradient(const at::Tensor& flat_index_in, const at::Tensor& local_in, const at::Tensor& grad_terms,
                           std::vector<int64_t> sizes, at::ScalarType dtype) {
  TORCH_CHECK(flat_index_in.device().is_cpu() && flat_index_in.scalar_type() == at::kLong && flat_index_in.dim() == 1,
              "sparse_gradient: 1-D int64 CPU indices");
  TORCH_CHECK(local_in.dim() == 1 && local_in.numel() == flat_index_in.numel(),
              "sparse_gradient: one factor per index");
  const int64_t D = static_cast<int64_t>(sizes.size()), K = flat_index_in.numel();
  TORCH_CHECK(D > 0, "sparse_gradient: a tensor of at least one dimension");
  TORCH_CHECK(local_in.scalar_type() == at::kFloat && grad_terms.numel() == 1, "sparse_gradient: float32 factors");
  at::Tensor flat_index = flat_index_in.contiguous();
  const at::Tensor local = local_in.contiguous();
  const float g = grad_terms.scalar_type() == at::kFloat && grad_terms.is_contiguous()
                      ? *grad_terms.const_data_ptr<float>()
                      : grad_terms.item<float>();
  at::Tensor values = at::empty({K}, local.options().dtype(dtype));
  const float* lp = local.const_data_ptr<float>();
  // local * grad_terms, rounded to the activation's dtype like (local * g).to(dtype)
  with_value_type(dtype, "sparse_gradient", [&](auto tag) {
    using T = decltype(tag);
    T* vp = values.data_ptr<T>();
    for (int64_t i = 0; i < K; ++i) vp[i] = static_cast<T>(lp[i] * g);
  });
  const int64_t* flat = flat_index.const_data_ptr<int64_t>();
  bool increasing = true;
  for (int64_t i = 1; i < K; ++i) increasing &= flat[i - 1] < flat[i];
  if (!increasing) {  // (eager top-n: unordered within a sample)
    at::Tensor order;
    std::tie(flat_index, order) = flat_index.sort();
    values = values.index_select(0, order);
    flat = flat_index.const_data_ptr<int64_t>();
    increasing = true;
    for (int64_t i = 1; i < K; ++i) increasing &= flat[i - 1] < flat[i];
  }
  std::vector<int64_t> strides(static_cast<size_t>(D), 1);
  for (int64_t d = D - 2; d >= 0; --d) strides[d] = strides[d + 1] * sizes[d + 1];
  const int64_t total = strides[0] * sizes[0];
  TORCH_CHECK(total < (int64_t(1) << 53), "sparse_gradient: tensor too large");
  at::Tensor indices = at::empty({D, K}, flat_index.options());
  int64_t* o = indices.data_ptr<int64_t>();
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(flat[i] >= 0 && flat[i] < total, "sparse_gradient: index out of range");
  }
  std::vector<double> inverse(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) inverse[d] = 1.0 / static_cast<double>(strides[d]);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t f = flat[i];
    int64_t outer = 0;  // f / strides[d - 1]
    for (int64_t d = 0; d < D; ++d) {
      const int64_t stride = strides[d];
      int64_t q = static_cast<int64_t>(static_cast<double>(f) * inverse[d]);  // f / stride, maybe off by one
      while (q * stride > f) --q;
      while ((q + 1) * stride <= f) ++q;
      o[d * K + i] = q - outer * sizes[d];
      outer = q;
    }
  }
  at::Tensor sparse = at::_sparse_coo_tensor_unsafe(indices, values, sizes, values.options().layout(at::kSparse));
  if (increasing) sparse._coalesced_(true);
  return sparse;
}

// Who holds a gradient handed to a backward function: (its TensorImpl use count as seen
// through this call, and whether it is a plain dense contiguous CPU tensor whose storage
// nothing else shares: no other tensor over it, and, for a view, a base that only the view
// holds). With the Python reference count, this tells whether autograd alone holds it
// (LogMSLoss.backward compares both with a calibrated case, see kernels.py).
std::tuple<int64_t, bool> gradient_ownership(const at::Tensor& grad) {
  bool plain = grad.defined() && grad.layout() == at::kStrided && grad.device().is_cpu() && grad.has_storage() &&
               grad.is_contiguous() && !at::isTensorSubclassLike(grad) && !grad._is_zerotensor() && !grad.is_neg() &&
               !grad.is_conj();
  if (!plain) return {grad.defined() ? static_cast<int64_t>(grad.use_count()) : 0, false};
  int64_t sharers = static_cast<int64_t>(grad.storage().use_count());
  if (grad.is_view()) {
    plain = grad._base().use_count() == 1;
    sharers -= 1;  // (the base's own hold on the storage)
  }
  return {static_cast<int64_t>(grad.use_count()), plain && sharers == 1};
}

// grad[flat_index] += local * grad_terms, in place, each term rounded to grad's dtype first
// (what adding the sparse gradient of sparse_gradient into grad computes). For a gradient
// that gradient_ownership found autograd alone holds: no sparse tensor, no accumulation.
template <typename T>
void add_terms_loop(T* g, const float* lp, const int64_t* flat, int64_t K, int64_t total, float gt) {
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(flat[i] >= 0 && flat[i] < total, "add_terms_gradient_: index out of range");
    const T term = static_cast<T>(lp[i] * gt);
    g[flat[i]] = static_cast<T>(static_cast<float>(g[flat[i]]) + static_cast<float>(term));
  }
}

void add_terms_gradient_(at::Tensor grad, const at::Tensor& flat_index, const at::Tensor& local,
                         const at::Tensor& grad_terms) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "add_terms_gradient_: not while recording a graph");
  TORCH_CHECK(grad.device().is_cpu() && grad.is_contiguous() && grad.layout() == at::kStrided,
              "add_terms_gradient_: a contiguous CPU gradient");
  TORCH_CHECK(flat_index.scalar_type() == at::kLong && flat_index.is_contiguous() && flat_index.dim() == 1 &&
                  local.scalar_type() == at::kFloat && local.is_contiguous() && local.numel() == flat_index.numel() &&
                  grad_terms.numel() == 1,
              "add_terms_gradient_: bad indices or factors");
  const float gt = grad_terms.item<float>();
  const int64_t K = flat_index.numel(), total = grad.numel();
  const int64_t* flat = flat_index.const_data_ptr<int64_t>();
  const float* lp = local.const_data_ptr<float>();
  with_value_type(grad.scalar_type(), "add_terms_gradient_", [&](auto tag) {
    add_terms_loop(grad.data_ptr<decltype(tag)>(), lp, flat, K, total, gt);
  });
}

// ---------------------------------------------------------------------------------------
// Per-neuron bookkeeping, fused: the same arithmetic as module.py's torch code (float64),
// one loop over the neurons instead of dozens of vector operations.

static void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == n,
              "memel native bookkeeping: bad tensor ", name);
}

// pending[0..2] += (samples, sum_d, sum_d2) where both sums are finite; the MS window rows
// ms_sum += sum_d2 * scale^2 and ms_n += samples where sum_d2 is finite; on tracked calls
// (max_scaled and above given) above += above, tracked += samples and
// ms_max = max(ms_max, nan_to_num(max_scaled^2)). In place.
void record_moments(at::Tensor pending, at::Tensor window, const at::Tensor& sum_d, const at::Tensor& sum_d2,
                    const at::Tensor& scale, int64_t samples, int64_t ms_sum_row, int64_t ms_n_row,
                    const c10::optional<at::Tensor>& max_scaled, const c10::optional<at::Tensor>& above,
                    int64_t above_row, int64_t tracked_row, int64_t max_row) {
  const int64_t n = sum_d.numel();
  TORCH_CHECK(pending.dim() == 2 && pending.size(1) == n && window.dim() == 2 && window.size(1) == n);
  check_vector(pending, at::kDouble, pending.numel(), "pending");
  check_vector(window, at::kDouble, window.numel(), "window");
  check_vector(sum_d, at::kFloat, n, "sum_d");
  check_vector(sum_d2, at::kFloat, n, "sum_d2");
  check_vector(scale, at::kFloat, n, "scale");
  double* count = pending.data_ptr<double>();
  double* s1 = count + n;
  double* s2 = s1 + n;
  double* ms_sum = window.data_ptr<double>() + ms_sum_row * n;
  double* ms_n = window.data_ptr<double>() + ms_n_row * n;
  const float* d1 = sum_d.data_ptr<float>();
  const float* d2 = sum_d2.data_ptr<float>();
  const float* a = scale.data_ptr<float>();
  const double b = static_cast<double>(samples);
  const bool track = max_scaled.has_value() && above.has_value();
  const float* mx = nullptr;
  const int32_t* ab = nullptr;
  double* w_above = nullptr;
  double* w_tracked = nullptr;
  double* w_max = nullptr;
  if (track) {
    check_vector(*max_scaled, at::kFloat, n, "max_scaled");
    check_vector(*above, at::kInt, n, "above");
    mx = max_scaled->data_ptr<float>();
    ab = above->data_ptr<int32_t>();
    w_above = window.data_ptr<double>() + above_row * n;
    w_tracked = window.data_ptr<double>() + tracked_row * n;
    w_max = window.data_ptr<double>() + max_row * n;
  }
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (track) {
        w_above[j] += static_cast<double>(ab[j]);
        w_tracked[j] += b;
        double sq = static_cast<double>(mx[j]) * static_cast<double>(mx[j]);
        if (std::isnan(sq)) sq = 0.0;
        else if (std::isinf(sq)) sq = std::numeric_limits<double>::max();
        if (sq > w_max[j] || std::isnan(w_max[j])) w_max[j] = sq;
      }
      const bool finite2 = std::isfinite(d2[j]);
      if (finite2 && std::isfinite(d1[j])) {
        count[j] += b;
        s1[j] += static_cast<double>(d1[j]);
        s2[j] += static_cast<double>(d2[j]);
      }
      if (finite2) {
        const double scale_j = static_cast<double>(a[j]);
        ms_sum[j] += static_cast<double>(d2[j]) * (scale_j * scale_j);
        ms_n[j] += b;
      }
    }
  });
}

// Merge pending moments (sums about the history mean) into the history with Lemma 3.2; when
// `capped`, the history weighs forget_steps batches of the incoming size (Algorithm 1).
void merge_moments(at::Tensor mean, at::Tensor var, at::Tensor count, const at::Tensor& pending, bool capped,
                   int64_t forget_steps) {
  const int64_t n = mean.numel();
  check_vector(mean, at::kFloat, n, "mean");
  check_vector(var, at::kFloat, n, "var");
  check_vector(count, at::kLong, n, "count");
  TORCH_CHECK(pending.dim() == 2 && pending.size(1) == n);
  check_vector(pending, at::kDouble, pending.numel(), "pending");
  float* mu_out = mean.data_ptr<float>();
  float* nu_out = var.data_ptr<float>();
  int64_t* cnt = count.data_ptr<int64_t>();
  const double* pb = pending.data_ptr<double>();
  const double* ps1 = pb + n;
  const double* ps2 = ps1 + n;
  const double nf = static_cast<double>(forget_steps);
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const double b = pb[j];
      if (!(b > 0)) continue;
      const double mu = static_cast<double>(mu_out[j]);
      const double nu = static_cast<double>(nu_out[j]);
      const double delta = ps1[j] / b;
      const double mean_b = mu + delta;
      const double m2 = std::max(ps2[j] - ps1[j] * delta, 0.0);
      double m = static_cast<double>(cnt[j]);
      if (capped && m > 0) m = nf * b;
      double out_mu, out_nu;
      if (m == 0) {
        out_mu = mean_b;
        out_nu = m2 / std::max(b - 1, 1.0);
      } else {
        const double total = m + b;
        const double dof = std::max(total - 1, 1.0);
        const double d = mu - mean_b;
        out_mu = (m * mu + b * mean_b) / total;
        out_nu = m * b * d * d / (dof * total) + (m2 + (m - 1) * nu) / dof;
      }
      mu_out[j] = static_cast<float>(out_mu);
      nu_out[j] = static_cast<float>(std::max(out_nu, 0.0));
      cnt[j] += static_cast<int64_t>(b);
    }
  });
}

// Tests: switch the register-blocked AVX-512 pass off (and on again) to compare both passes;
// returns whether it can run on this CPU.
bool set_vector_path(bool enabled) {
  g_vector_path = true;
  const bool available = vector_path_available();
  g_vector_path = enabled;
  return available;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_vector_path", &set_vector_path,
        "switch the register-blocked AVX-512 pass on or off (tests); returns whether this CPU can run it");
  m.def("measure", &measure, "memel fused inhibition measurement (one pass over [samples, neurons] values)",
        pybind11::arg("values"), pybind11::arg("mean"), pybind11::arg("scale"), pybind11::arg("top_n"),
        pybind11::arg("sqrt_threshold"), pybind11::arg("track"), pybind11::arg("copy"), pybind11::arg("threads") = 0,
        pybind11::arg("select_threshold") = -1.0, pybind11::arg("sorted_rows") = false);
  m.def("record_moments", &record_moments, "add one call's moments and MS trackers to pending and window, in place",
        pybind11::arg("pending"), pybind11::arg("window"), pybind11::arg("sum_d"), pybind11::arg("sum_d2"),
        pybind11::arg("scale"), pybind11::arg("samples"), pybind11::arg("ms_sum_row"), pybind11::arg("ms_n_row"),
        pybind11::arg("max_scaled") = pybind11::none(), pybind11::arg("above") = pybind11::none(),
        pybind11::arg("above_row") = 0, pybind11::arg("tracked_row") = 0, pybind11::arg("max_row") = 0);
  m.def("measure_fold", &measure_fold,
        "one training call measured and folded into the history in one pass (local path), in place",
        pybind11::arg("values"), pybind11::arg("mean"), pybind11::arg("var"), pybind11::arg("count"),
        pybind11::arg("window"), pybind11::arg("prev_mean"), pybind11::arg("comp"), pybind11::arg("top_n"),
        pybind11::arg("sqrt_threshold"), pybind11::arg("track"), pybind11::arg("copy"), pybind11::arg("threads"),
        pybind11::arg("select_threshold"), pybind11::arg("capped"), pybind11::arg("forget_steps"),
        pybind11::arg("count_offset"), pybind11::arg("all_counted"), pybind11::arg("ms_sum_row"), pybind11::arg("ms_n_row"),
        pybind11::arg("above_row"), pybind11::arg("max_row"), pybind11::arg("selected_row") = -1,
        pybind11::arg("inhibited_row") = -1, pybind11::arg("reuse") = pybind11::none(), pybind11::arg("delta") = -1.0,
        pybind11::arg("calls") = pybind11::none(), pybind11::arg("calls_value") = 0,
        pybind11::arg("batches") = pybind11::none());
  m.def("reversed_gradient", &reversed_gradient,
        "Reverse Deactivation's gradient (selected values times -strength) into a reused buffer",
        pybind11::arg("grad"), pybind11::arg("flat_index"), pybind11::arg("strength"),
        pybind11::arg("reuse") = pybind11::none());
  m.def("log_ms_terms", &log_ms_terms, "mode l2e's loss terms of one call and their gradient per value",
        pybind11::arg("values"), pybind11::arg("flat_index"), pybind11::arg("neuron_index"), pybind11::arg("mean"),
        pybind11::arg("delta"));
  m.def("gradient_ownership", &gradient_ownership,
        "(use count, whether nothing but the tensor (and a base only it holds) shares its storage)");
  m.def("add_terms_gradient_", &add_terms_gradient_, "grad[flat_index] += local * grad_terms, in place");
  m.def("reverse_selected_", &reverse_selected_, "grad[flat_index] *= -strength (0 for strength 0), in place");
  m.def("sparse_gradient", &sparse_gradient, "mode l2e's sparse gradient of one call (coalesced where it can be)",
        pybind11::arg("flat_index"), pybind11::arg("local"), pybind11::arg("grad_terms"), pybind11::arg("sizes"),
        pybind11::arg("dtype"));
  m.def("merge_moments", &merge_moments, "merge pending moments into the history (Lemma 3.2, forget step), in place");
}
