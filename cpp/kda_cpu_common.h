// Building blocks of the CPU KDA kernels (kda_fwd_cpu.cc, kda_bwd_cpu.cc): dtype conversion, small SIMD
// helpers (GCC/Clang vector extensions, so that one source compiles to SSE2, AVX2+FMA or AVX-512 code),
// vectorisable exp/log1p, the fused pre-processing of one token (l2norm, scale, gate, beta), state block
// I/O, and a deterministic parallel-for over XLA's CPU thread pool.
//
// The recurrence is column-separable: column v of the state S (K x V) only ever meets column v of v, o and
// the residual. The kernels therefore walk the state in blocks of VB columns (Cfg::VB), K x VB, small enough
// to stay in L1 while the tokens stream past.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "kda_problem.h"

#if defined(__GNUC__) || defined(__clang__)
#define FKDA_INLINE inline __attribute__((always_inline))
#define FKDA_RESTRICT __restrict__
#else
#define FKDA_INLINE inline
#define FKDA_RESTRICT
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define FKDA_X86_DISPATCH 1
#define FKDA_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FKDA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#else
#define FKDA_X86_DISPATCH 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace flashkda {
namespace cpu {

// ------------------------------------------------------------------------------------------------
// Storage types and conversion.
// ------------------------------------------------------------------------------------------------

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

FKDA_INLINE float BitsToFloat(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FKDA_INLINE uint32_t FloatToBits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

FKDA_INLINE float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Shift exponent+mantissa into place and rescale by 2^112: exact for normals and subnormals.
  float f = BitsToFloat(em << 13) * BitsToFloat(0x77800000u);
  uint32_t u = FloatToBits(f);
  if (em >= 0x7c00u) u |= 0x7f800000u;  // inf / nan
  return BitsToFloat(u | sign);
}

FKDA_INLINE uint16_t FloatToHalf(float f) {  // round to nearest even
  uint32_t x = FloatToBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                    // below 2^-14: subnormal half
    const float t = BitsToFloat(x) + 0.5f;                  // ulp of 0.5f is 2^-24, the half subnormal step
    return uint16_t(sign | (FloatToBits(t) - 0x3f000000u));
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000000u + 0xfffu + odd;  // rebias the exponent (-112 << 23, mod 2^32) and round
  return uint16_t(sign | (x >> 13));
}

FKDA_INLINE uint16_t FloatToBf16(float f) {  // round to nearest even
  uint32_t u = FloatToBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

template <class T> struct Cvt;
template <> struct Cvt<float> {
  using Acc = float;
  static FKDA_INLINE float Load(float x) { return x; }
  static FKDA_INLINE float Store(float x) { return x; }
};
template <> struct Cvt<double> {
  using Acc = double;
  static FKDA_INLINE double Load(double x) { return x; }
  static FKDA_INLINE double Store(double x) { return x; }
};
template <> struct Cvt<BF16> {
  using Acc = float;
  static FKDA_INLINE float Load(BF16 x) { return BitsToFloat(uint32_t(x.bits) << 16); }
  static FKDA_INLINE BF16 Store(float x) { return BF16{FloatToBf16(x)}; }
};
template <> struct Cvt<F16> {
  using Acc = float;
  static FKDA_INLINE float Load(F16 x) { return HalfToFloat(x.bits); }
  static FKDA_INLINE F16 Store(float x) { return F16{FloatToHalf(x)}; }
};

// ------------------------------------------------------------------------------------------------
// SIMD. A kernel configuration: accumulation type, vector width in bytes, vectors per state-block row.
// ------------------------------------------------------------------------------------------------

template <class T, int Bytes> struct VecN {
  typedef T type __attribute__((vector_size(Bytes)));
};
template <class AccT, int Bytes, int Rows> struct Cfg {
  using Acc = AccT;
  using V = typename VecN<AccT, Bytes>::type;
  static constexpr int W = Bytes / int(sizeof(AccT));  // lanes
  static constexpr int R = Rows;                       // vectors per block row
  static constexpr int VB = W * Rows;                  // state block width (V columns)
};

template <class V, class T> FKDA_INLINE V VLoad(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V, class T> FKDA_INLINE void VStore(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
template <class V, class T> FKDA_INLINE V VSplat(T s) { V v = {}; return v + s; }
// Horizontal sums in a fixed order.
#if defined(__clang__)
#define FKDA_SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define FKDA_SHUFFLE1(a, ...) __builtin_shufflevector(a, a, __VA_ARGS__)
#else
#define FKDA_SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (I4){__VA_ARGS__})
#define FKDA_SHUFFLE1(a, ...) __builtin_shuffle(a, (I4){__VA_ARGS__})
#endif

template <class T> struct Half;
template <> struct Half<float> {
  typedef float type __attribute__((vector_size(16)));
  typedef int32_t itype __attribute__((vector_size(16)));
};
template <> struct Half<double> {
  typedef double type __attribute__((vector_size(16)));
  typedef int64_t itype __attribute__((vector_size(16)));
};

// (sum of a's lanes, sum of b's lanes) for two vectors of 16 bytes or more, in a fixed order.
template <class T, class V> FKDA_INLINE void HSum2(V a, V b, T* sa, T* sb) {
  if constexpr (sizeof(V) > 16) {
    using Hv = typename VecN<T, int(sizeof(V) / 2)>::type;
    Hv alo, ahi, blo, bhi;
    std::memcpy(&alo, &a, sizeof(Hv));
    std::memcpy(&ahi, reinterpret_cast<const char*>(&a) + sizeof(Hv), sizeof(Hv));
    std::memcpy(&blo, &b, sizeof(Hv));
    std::memcpy(&bhi, reinterpret_cast<const char*>(&b) + sizeof(Hv), sizeof(Hv));
    HSum2<T, Hv>(alo + ahi, blo + bhi, sa, sb);
  } else {
    using I4 = typename Half<T>::itype;
    const V x = a, y = b;
    if constexpr (sizeof(T) == 4) {
      V u = FKDA_SHUFFLE2(x, y, 0, 1, 4, 5) + FKDA_SHUFFLE2(x, y, 2, 3, 6, 7);  // x0+x2 x1+x3 y0+y2 y1+y3
      V w = u + FKDA_SHUFFLE1(u, 1, 0, 3, 2);
      *sa = w[0];
      *sb = w[2];
    } else {
      V u = FKDA_SHUFFLE2(x, y, 0, 2) + FKDA_SHUFFLE2(x, y, 1, 3);
      *sa = u[0];
      *sb = u[1];
    }
  }
}
template <class T, class V> FKDA_INLINE T HSum(V a) {
  T x, y;
  HSum2<T, V>(a, a, &x, &y);
  return x;
}

// Dot product of two contiguous arrays with 8 interleaved partial sums (vectorises without -ffast-math).
template <class T> FKDA_INLINE T Dot(const T* FKDA_RESTRICT a, const T* FKDA_RESTRICT b, int64_t n) {
  T p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) p[l] += a[i + l] * b[i + l];
  for (int l = 0; i < n; ++i, ++l) p[l] += a[i] * b[i];
  return ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
}

// ------------------------------------------------------------------------------------------------
// Element-wise math that the compiler can vectorise (float); double uses libm.
// ------------------------------------------------------------------------------------------------

FKDA_INLINE float ExpF(float x) {
  const float xc = std::min(std::max(x, -88.0f), 88.0f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  float r = xc - n * 0.693359375f;                                           // Cody-Waite: ln2 = hi + lo
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  return p * BitsToFloat(static_cast<uint32_t>(e > 0 ? e : 0) << 23);
}

// log(1 + y) for y in [0, 1], accurate for tiny y (never forms 1 + y when y is small).
FKDA_INLINE float Log1p01F(float y) {
  const bool big = y > 0.41421356f;
  const float f = big ? (y - 1.0f) * 0.5f : y;  // 1 + y = 2 (1 + f) when big
  const float s = f / (2.0f + f);
  const float z = s * s;
  float p = 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  p = p * z + 1.0f;
  return 2.0f * s * p + (big ? 0.69314718055994531f : 0.0f);
}

template <class T> FKDA_INLINE T Exp(T x);
template <> FKDA_INLINE float Exp<float>(float x) { return ExpF(x); }
template <> FKDA_INLINE double Exp<double>(double x) { return std::exp(x); }

template <class T> FKDA_INLINE T Softplus(T x);  // log(1 + e^x), stable
template <> FKDA_INLINE float Softplus<float>(float x) {
  return std::max(x, 0.0f) + Log1p01F(ExpF(-std::fabs(x)));
}
template <> FKDA_INLINE double Softplus<double>(double x) {
  return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x)));
}
template <class T> FKDA_INLINE T Sigmoid(T x) { return T(1) / (T(1) + Exp<T>(-x)); }

// ------------------------------------------------------------------------------------------------
// Aligned scratch buffers.
// ------------------------------------------------------------------------------------------------

template <class T> struct Buf {
  T* p = nullptr;
  size_t n = 0;
  Buf() = default;
  explicit Buf(size_t count, bool zero = false) { Reset(count, zero); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  ~Buf() { std::free(p); }
  void Reset(size_t count, bool zero = false) {
    std::free(p);
    p = nullptr;
    n = count;
    if (count == 0) return;
    size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (p == nullptr) throw std::bad_alloc();
    if (zero) std::memset(p, 0, bytes);
  }
  T* data() const { return p; }
  T& operator[](size_t i) const { return p[i]; }
};

// ------------------------------------------------------------------------------------------------
// Problem description shared by forward and backward.
// ------------------------------------------------------------------------------------------------

struct Problem {
  KdaShape s;
  KdaOptions opt;
  int64_t S_in = 0;   // slots of the initial state (0 = none)
  int64_t S_out = 0;  // slots of the final state / its cotangent (0 = none)
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* g = nullptr;
  const void* beta = nullptr;
  const float* a_log = nullptr;
  const float* dt_bias = nullptr;
  const int32_t* slot = nullptr;
  const void* init = nullptr;
};

// Per-token flags of one batch row.
enum : uint8_t { kValid = 1, kStart = 2, kEnd = 4 };

inline void TokenFlags(const int32_t* slot, int64_t T, uint8_t* flags) {
  for (int64_t t = 0; t < T; ++t) {
    const int32_t s = slot[t];
    uint8_t f = 0;
    if (s >= 0) {
      f |= kValid;
      if (t == 0 || slot[t - 1] != s) f |= kStart;
      if (t == T - 1 || slot[t + 1] != s) f |= kEnd;
    }
    flags[t] = f;
  }
}

// ------------------------------------------------------------------------------------------------
// Pre-processing of one token for one value head: q (l2norm, scale), k (l2norm), decay a = exp(g_eff),
// beta_eff. Rows are contiguous arrays of K.
// ------------------------------------------------------------------------------------------------

template <class In, class Acc>
FKDA_INLINE void LoadRow(const In* FKDA_RESTRICT src, Acc* FKDA_RESTRICT dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = Acc(Cvt<In>::Load(src[i]));
}

template <class Acc> FKDA_INLINE Acc L2Rsqrt(const Acc* x, int64_t n) {
  return Acc(1) / std::sqrt(Dot<Acc>(x, x, n) + Acc(1e-6));
}

// Effective log-decay from the raw gate row (already converted to Acc), in place.
template <class Acc>
FKDA_INLINE void GateEff(Acc* FKDA_RESTRICT g, const float* FKDA_RESTRICT dtb, Acc A, const KdaOptions& opt,
                         int64_t K) {
  switch (opt.gate) {
    case GateMode::kPrecomputed:
      break;
    case GateMode::kSoftplus:
      for (int64_t i = 0; i < K; ++i) g[i] = -A * Softplus<Acc>(g[i] + Acc(dtb[i]));
      break;
    case GateMode::kBounded: {
      const Acc lb = Acc(opt.lower_bound);
      if (opt.use_a_log) {
        for (int64_t i = 0; i < K; ++i) g[i] = lb * Sigmoid<Acc>(A * (g[i] + Acc(dtb[i])));
      } else {
        for (int64_t i = 0; i < K; ++i) g[i] = lb * Sigmoid<Acc>(g[i] + Acc(dtb[i]));
      }
      break;
    }
  }
}

template <class Acc> FKDA_INLINE Acc BetaEff(Acc b, const KdaOptions& opt) {
  if (!opt.beta_sigmoid) return b;
  const Acc s = Sigmoid<Acc>(b);
  return opt.allow_neg_eigval ? Acc(2) * s : s;
}

// Pre-processes tokens [t0, t1) of row b, value head hv into per-token rows of K (q, k, a) and beta.
// Padding tokens get zeros.
template <class In, class Acc>
FKDA_INLINE void Preprocess(const Problem& P, int64_t b, int64_t hv, int64_t t0, int64_t t1, const uint8_t* flags,
                            Acc* FKDA_RESTRICT qe, Acc* FKDA_RESTRICT ke, Acc* FKDA_RESTRICT ae,
                            Acc* FKDA_RESTRICT be) {
  const KdaShape& s = P.s;
  const int64_t K = s.K, H = s.H, HV = s.HV, T = s.T;
  const int64_t h = hv / s.group();
  const In* q = static_cast<const In*>(P.q);
  const In* k = static_cast<const In*>(P.k);
  const In* g = static_cast<const In*>(P.g);
  const In* beta = static_cast<const In*>(P.beta);
  const float* dtb = P.dt_bias + (b * HV + hv) * K;
  const Acc A = std::exp(Acc(P.a_log[b * HV + hv]));
  const Acc scale = Acc(P.opt.scale);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t j = t - t0;
    Acc* qr = qe + j * K;
    Acc* kr = ke + j * K;
    Acc* ar = ae + j * K;
    if (!(flags[t] & kValid)) {
      std::fill(qr, qr + K, Acc(0));
      std::fill(kr, kr + K, Acc(0));
      std::fill(ar, ar + K, Acc(0));
      be[j] = 0;
      continue;
    }
    const int64_t bt = b * T + t;
    LoadRow<In, Acc>(q + (bt * H + h) * K, qr, K);
    LoadRow<In, Acc>(k + (bt * H + h) * K, kr, K);
    Acc qs = scale, ks = 1;
    if (P.opt.qk_l2norm) {
      qs *= L2Rsqrt<Acc>(qr, K);
      ks = L2Rsqrt<Acc>(kr, K);
    }
    for (int64_t i = 0; i < K; ++i) qr[i] *= qs;
    if (P.opt.qk_l2norm)
      for (int64_t i = 0; i < K; ++i) kr[i] *= ks;
    LoadRow<In, Acc>(g + (bt * HV + hv) * K, ar, K);
    GateEff<Acc>(ar, dtb, A, P.opt, K);
    for (int64_t i = 0; i < K; ++i) ar[i] = Exp<Acc>(ar[i]);
    be[j] = BetaEff<Acc>(Acc(Cvt<In>::Load(beta[bt * HV + hv])), P.opt);
  }
}

// ------------------------------------------------------------------------------------------------
// State blocks: columns [c0, c0 + nc) of one [K, V] ([V, K] when vk) state matrix <-> a K x VB block.
// ------------------------------------------------------------------------------------------------

template <class Acc>
FKDA_INLINE void LoadStateBlock(const Acc* src, bool vk, int64_t K, int64_t V, int64_t c0, int64_t nc, int VB,
                                Acc* FKDA_RESTRICT blk) {
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = blk + i * VB;
    if (src == nullptr) {
      std::fill(row, row + VB, Acc(0));
      continue;
    }
    if (vk) {
      for (int64_t c = 0; c < nc; ++c) row[c] = src[(c0 + c) * K + i];
    } else {
      for (int64_t c = 0; c < nc; ++c) row[c] = src[i * V + c0 + c];
    }
    for (int64_t c = nc; c < VB; ++c) row[c] = 0;
  }
}

template <class Acc>
FKDA_INLINE void StoreStateBlock(Acc* dst, bool vk, int64_t K, int64_t V, int64_t c0, int64_t nc, int VB,
                                 const Acc* FKDA_RESTRICT blk, bool accumulate) {
  for (int64_t i = 0; i < K; ++i) {
    const Acc* row = blk + i * VB;
    if (vk) {
      if (accumulate)
        for (int64_t c = 0; c < nc; ++c) dst[(c0 + c) * K + i] += row[c];
      else
        for (int64_t c = 0; c < nc; ++c) dst[(c0 + c) * K + i] = row[c];
    } else {
      if (accumulate)
        for (int64_t c = 0; c < nc; ++c) dst[i * V + c0 + c] += row[c];
      else
        for (int64_t c = 0; c < nc; ++c) dst[i * V + c0 + c] = row[c];
    }
  }
}

// Copies columns [c0, c0 + nc) of a state matrix (or zeros them when src is null).
template <class Acc>
FKDA_INLINE void CopyStateCols(Acc* dst, const Acc* src, bool vk, int64_t K, int64_t V, int64_t c0, int64_t nc) {
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t idx = vk ? (c0 + c) * K + i : i * V + c0 + c;
      dst[idx] = src ? src[idx] : Acc(0);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Parallel for over XLA's intra-op pool. The calling thread works too and only waits for items that were
// claimed, so it can never deadlock on a busy pool; late helpers find no work and exit, touching only the
// shared control block they co-own. Items run in any order but each writes disjoint outputs, so results
// do not depend on scheduling.
// ------------------------------------------------------------------------------------------------

struct ForState {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> failed{false};
  int64_t n = 0;
  void (*call)(void*, int64_t) = nullptr;
  void* fn = nullptr;
  std::mutex mu;
  std::condition_variable cv;
  std::string error;

  void Work() {
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= n) return;
      if (!failed.load(std::memory_order_relaxed)) {
        try {
          call(fn, i);
        } catch (const std::exception& e) {
          Fail(e.what());
        } catch (...) {
          Fail("unknown error");
        }
      }
      if (done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(mu);
        cv.notify_all();
      }
    }
  }
  void Fail(const char* what) {
    std::lock_guard<std::mutex> lock(mu);
    if (!failed.exchange(true)) error = what;
  }
};

template <class F>
inline ffi::Error ParallelFor(ffi::ThreadPool& pool, int64_t n, F&& f) {
  if (n <= 0) return ffi::Error::Success();
  auto st = std::make_shared<ForState>();
  st->n = n;
  st->fn = static_cast<void*>(&f);
  st->call = [](void* fn, int64_t i) { (*static_cast<std::remove_reference_t<F>*>(fn))(i); };
  int64_t threads = 0;
  try {
    threads = pool.num_threads();
  } catch (...) {
    threads = 0;
  }
  const int64_t helpers = std::min<int64_t>(n - 1, threads - 1);
  for (int64_t i = 0; i < helpers; ++i) {
    try {
      pool.Schedule([st]() { st->Work(); });
    } catch (...) {
      break;  // the caller does the rest
    }
  }
  st->Work();
  {
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load() >= n; });
  }
  if (st->failed.load()) {
    return ffi::Error::Internal("flashkda: CPU kernel failed: " + st->error);
  }
  return ffi::Error::Success();
}

// Runs body() and turns C++ exceptions (allocation failures) into FFI errors.
template <class F> inline ffi::Error Guard(const char* op, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string(op) + ": out of host memory");
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(op) + ": " + e.what());
  }
}

// Checks that a result buffer has the expected element count and dtype.
inline ffi::Error CheckResult(const char* op, const char* name, const ffi::AnyBuffer& buf, size_t count,
                              ffi::DataType dtype) {
  if (buf.element_count() != count) {
    return ffi::Error::InvalidArgument(std::string(op) + ": result " + name + " has " +
                                       std::to_string(buf.element_count()) + " elements, expected " +
                                       std::to_string(count));
  }
  if (count > 0 && buf.element_type() != dtype) {
    return ffi::Error::InvalidArgument(std::string(op) + ": result " + name + " has the wrong dtype");
  }
  return ffi::Error::Success();
}

}  // namespace cpu
}  // namespace flashkda

namespace flashkda {
namespace cpu {

template <class InT, class AccT> struct TypeTag {
  using In = InT;
  using Acc = AccT;
};

// Calls fn(TypeTag<In, Acc>{}) for the input dtype.
template <class Fn> inline ffi::Error DispatchDtype(const char* op, ffi::DataType dt, Fn&& fn) {
  switch (dt) {
    case ffi::DataType::F32: return fn(TypeTag<float, float>{});
    case ffi::DataType::F64: return fn(TypeTag<double, double>{});
    case ffi::DataType::BF16: return fn(TypeTag<BF16, float>{});
    case ffi::DataType::F16: return fn(TypeTag<F16, float>{});
    default:
      return ffi::Error::InvalidArgument(std::string(op) + ": q, k, v, g, beta must be bf16, f16, f32 or f64");
  }
}

// 0: generic, 1: AVX2+FMA, 2: AVX-512 (F, VL, DQ). FLASHKDA_CPU_ISA=generic|avx2 caps it (for tests).
inline int CpuLevel() {
#if FKDA_X86_DISPATCH
  static const int level = [] {
    int cap = 2;
    if (const char* env = std::getenv("FLASHKDA_CPU_ISA")) {
      const std::string isa(env);
      if (isa == "generic") cap = 0;
      else if (isa == "avx2") cap = 1;
    }
    return std::min(cap, [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
    }());
  }();
  return level;
#else
  return 0;
#endif
}

// Decodes and validates the operands every op shares.
inline ffi::Error SetupProblem(const char* op, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                               const ffi::AnyBuffer& v, const ffi::AnyBuffer& g, const ffi::AnyBuffer& beta,
                               const ffi::AnyBuffer& a_log, const ffi::AnyBuffer& dt_bias,
                               const ffi::AnyBuffer& slot, const ffi::AnyBuffer& initial_state,
                               const KdaOptions& opt, Problem* P) {
  P->opt = opt;
  if (auto e = DecodeShape(q, k, v, g, beta, a_log, dt_bias, slot, initial_state, opt, &P->s); e.failure()) {
    return e;
  }
  switch (P->s.dtype) {
    case ffi::DataType::F32:
    case ffi::DataType::F64:
    case ffi::DataType::BF16:
    case ffi::DataType::F16:
      break;
    default:
      return ffi::Error::InvalidArgument(std::string(op) + ": q, k, v, g, beta must be bf16, f16, f32 or f64");
  }
  if (k.dimensions().size() != q.dimensions().size()) {
    return ffi::Error::InvalidArgument(std::string(op) + ": k must have q's shape");
  }
  P->S_in = P->s.has_initial_state ? P->s.S : 0;
  P->q = q.untyped_data();
  P->k = k.untyped_data();
  P->v = v.untyped_data();
  P->g = g.untyped_data();
  P->beta = beta.untyped_data();
  P->a_log = static_cast<const float*>(a_log.untyped_data());
  P->dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  P->slot = static_cast<const int32_t*>(slot.untyped_data());
  P->init = P->S_in > 0 ? initial_state.untyped_data() : nullptr;
  return ffi::Error::Success();
}

// Slots of an optional state-like buffer [..., S, HV, K, V]; checks it against the problem.
inline ffi::Error StateBufferSlots(const char* op, const char* name, const ffi::AnyBuffer& buf,
                                   const Problem& P, int64_t* slots) {
  *slots = 0;
  if (buf.element_count() == 0) return ffi::Error::Success();
  const KdaShape& s = P.s;
  const int64_t per = s.B * s.HV * s.K * s.V;
  if (per <= 0 || int64_t(buf.element_count()) % per != 0) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + name + " must be [..., S, HV, K, V]");
  }
  if (buf.element_type() != s.state_dtype) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + name +
                                       " must be float32 (float64 for float64 inputs)");
  }
  *slots = int64_t(buf.element_count()) / per;
  if (P.S_in > 0 && *slots != P.S_in) {
    return ffi::Error::InvalidArgument(std::string(op) + ": " + name +
                                       " must have as many state slots as initial_state");
  }
  return ffi::Error::Success();
}

}  // namespace cpu
}  // namespace flashkda
