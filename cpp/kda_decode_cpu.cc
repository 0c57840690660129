// CPU handler of flashkda_decode: a few tokens per row against a state (pool) updated in place.
// Operands, results and semantics: kda_decode_binding.h. Work is spread over (row, value head) pairs
// on XLA's intra-op thread pool; each pair reads its state once, applies its T tokens in order and
// writes it back once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "kda_bindings.h"
#include "kda_decode_binding.h"

namespace ffi = xla::ffi;

namespace {

using flashkda::DecodeDims;
using flashkda::GateMode;
using flashkda::KdaOptions;

// ---- scalar conversions (bf16 / f16 stored as uint16) ----------------------------------------------

inline float Bf16ToFloat(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t FloatToHalf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                        // below the smallest normal half: subnormal or 0
    if (abs < 0x33000000u) return sign;           // < 2^-25 rounds to 0
    const uint32_t e = abs >> 23;
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 - (e - 127) + 13 - 1 ... = bits dropped
    // value = man * 2^(e-150); half subnormal unit = 2^-24 -> keep man >> (126 - e).
    uint32_t q = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even at bit 13
  r -= 0x38000000u;                                // rebias 127 -> 15
  return sign | static_cast<uint16_t>(r >> 13);
}

template <ffi::DataType D>
struct Io;
template <>
struct Io<ffi::DataType::F32> {
  using Storage = float;
  using Acc = float;
  static Acc Load(const Storage* p, int64_t i) { return p[i]; }
  static void Store(Storage* p, int64_t i, Acc x) { p[i] = x; }
};
template <>
struct Io<ffi::DataType::F64> {
  using Storage = double;
  using Acc = double;
  static Acc Load(const Storage* p, int64_t i) { return p[i]; }
  static void Store(Storage* p, int64_t i, Acc x) { p[i] = x; }
};
template <>
struct Io<ffi::DataType::BF16> {
  using Storage = uint16_t;
  using Acc = float;
  static Acc Load(const Storage* p, int64_t i) { return Bf16ToFloat(p[i]); }
  static void Store(Storage* p, int64_t i, Acc x) { p[i] = FloatToBf16(x); }
};
template <>
struct Io<ffi::DataType::F16> {
  using Storage = uint16_t;
  using Acc = float;
  static Acc Load(const Storage* p, int64_t i) { return HalfToFloat(p[i]); }
  static void Store(Storage* p, int64_t i, Acc x) { p[i] = FloatToHalf(x); }
};

template <typename A>
inline A Sigmoid(A x) {
  return A(1) / (A(1) + std::exp(-x));
}

template <typename A>
inline A Softplus(A x) {  // log(1 + e^x), stable
  return std::max(x, A(0)) + std::log1p(std::exp(-std::abs(x)));
}

struct DecodePtrs {
  const void *q, *k, *v, *g, *beta;
  const float *a_log, *dt_bias;
  const int32_t* indices;
  void* state;  // the output state buffer (aliases the input one)
  void* o;
};

// One (row, value head) pair: read the state once, apply the row's T tokens, write it back once.
template <ffi::DataType D>
void DecodeOne(const DecodeDims& s, const KdaOptions& opt, const DecodePtrs& p, int64_t row, int64_t hv,
               std::vector<typename Io<D>::Acc>& scratch) {
  using IO = Io<D>;
  using S = typename IO::Storage;
  using A = typename IO::Acc;
  const int64_t K = s.K, V = s.V, T = s.T, HV = s.HV, H = s.H;
  const int64_t l = row / s.B, b = row % s.B;
  const int64_t slot = s.has_indices ? static_cast<int64_t>(p.indices[row]) : b;
  S* o = static_cast<S*>(p.o);
  if (slot < 0 || slot >= s.P) {  // padding / out-of-range index: o = 0, pool untouched
    for (int64_t t = 0; t < T; ++t) {
      const int64_t ob = ((row * T + t) * HV + hv) * V;
      for (int64_t j = 0; j < V; ++j) IO::Store(o, ob + j, A(0));
    }
    return;
  }
  scratch.resize(static_cast<size_t>(K * V + 3 * K + 2 * V));
  A* st = scratch.data();  // [K, V]
  A* qv = st + K * V;
  A* kv = qv + K;
  A* al = kv + K;
  A* tmp = al + K;  // [V]
  A* ov = tmp + V;  // [V]
  A* stv = reinterpret_cast<A*>(p.state) + ((l * s.P + slot) * HV + hv) * K * V;
  if (opt.state_vk) {
    for (int64_t j = 0; j < V; ++j)
      for (int64_t i = 0; i < K; ++i) st[i * V + j] = stv[j * K + i];
  } else {
    std::copy(stv, stv + K * V, st);
  }
  const S* q = static_cast<const S*>(p.q);
  const S* k = static_cast<const S*>(p.k);
  const S* v = static_cast<const S*>(p.v);
  const S* g = static_cast<const S*>(p.g);
  const S* beta = static_cast<const S*>(p.beta);
  const int64_t h = hv / s.group();
  const A a = std::exp(static_cast<A>(p.a_log[l * HV + hv]));
  const float* dtb = p.dt_bias + (l * HV + hv) * K;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t qb = ((row * T + t) * H + h) * K;
    const int64_t gb = ((row * T + t) * HV + hv) * K;
    const int64_t vb = ((row * T + t) * HV + hv) * V;
    A qn = 0, kn = 0;
    for (int64_t i = 0; i < K; ++i) {
      qv[i] = IO::Load(q, qb + i);
      kv[i] = IO::Load(k, qb + i);
      qn += qv[i] * qv[i];
      kn += kv[i] * kv[i];
    }
    A qs = static_cast<A>(opt.scale), ks = 1;
    if (opt.qk_l2norm) {
      qs /= std::sqrt(qn + A(1e-6));
      ks /= std::sqrt(kn + A(1e-6));
    }
    for (int64_t i = 0; i < K; ++i) {
      qv[i] *= qs;
      kv[i] *= ks;
      A x = IO::Load(g, gb + i);
      switch (opt.gate) {
        case GateMode::kPrecomputed:
          break;
        case GateMode::kSoftplus:
          x = -a * Softplus(x + static_cast<A>(dtb[i]));
          break;
        case GateMode::kBounded: {
          A y = x + static_cast<A>(dtb[i]);
          if (opt.use_a_log) y *= a;
          x = static_cast<A>(opt.lower_bound) * Sigmoid(y);
          break;
        }
      }
      al[i] = std::exp(x);
    }
    A bt = IO::Load(beta, (row * T + t) * HV + hv);
    if (opt.beta_sigmoid) {
      bt = Sigmoid(bt);
      if (opt.allow_neg_eigval) bt *= A(2);
    }
    // S' = diag(alpha) S; pred = S'^T k
    for (int64_t j = 0; j < V; ++j) tmp[j] = 0;
    for (int64_t i = 0; i < K; ++i) {
      A* rowp = st + i * V;
      const A ai = al[i], ki = kv[i];
      for (int64_t j = 0; j < V; ++j) {
        rowp[j] *= ai;
        tmp[j] += ki * rowp[j];
      }
    }
    // u = beta (v - pred); S = S' + k u^T; o = S^T q
    for (int64_t j = 0; j < V; ++j) tmp[j] = bt * (IO::Load(v, vb + j) - tmp[j]);
    for (int64_t j = 0; j < V; ++j) ov[j] = 0;
    for (int64_t i = 0; i < K; ++i) {
      A* rowp = st + i * V;
      const A ki = kv[i], qi = qv[i];
      for (int64_t j = 0; j < V; ++j) {
        rowp[j] += ki * tmp[j];
        ov[j] += qi * rowp[j];
      }
    }
    for (int64_t j = 0; j < V; ++j) IO::Store(o, vb + j, ov[j]);
  }
  if (opt.state_vk) {
    for (int64_t j = 0; j < V; ++j)
      for (int64_t i = 0; i < K; ++i) stv[j * K + i] = st[i * V + j];
  } else {
    std::copy(st, st + K * V, stv);
  }
}

template <ffi::DataType D>
void RunAll(ffi::ThreadPool& pool, const DecodeDims& s, const KdaOptions& opt, const DecodePtrs& p) {
  using A = typename Io<D>::Acc;
  const int64_t total = s.rows() * s.HV;
  if (total == 0) return;
  // Work in chunks of pairs; the calling thread works too, so this never waits on an idle pool.
  const int64_t per_pair = s.T * s.K * s.V;
  const int64_t chunk = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(per_pair, 1));
  const int64_t nchunks = (total + chunk - 1) / chunk;
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto sh = std::make_shared<Shared>();
  auto work = [sh, s, opt, p, total, chunk, nchunks]() {
    std::vector<A> scratch;
    int64_t finished = 0;
    for (;;) {
      const int64_t c = sh->next.fetch_add(1);
      if (c >= nchunks) break;
      const int64_t end = std::min(total, (c + 1) * chunk);
      for (int64_t i = c * chunk; i < end; ++i) DecodeOne<D>(s, opt, p, i / s.HV, i % s.HV, scratch);
      ++finished;
    }
    if (finished > 0 && sh->done.fetch_add(finished) + finished == nchunks) {
      std::lock_guard<std::mutex> lock(sh->mu);
      sh->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(nchunks - 1, std::max<int64_t>(0, pool.num_threads()));
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(sh->mu);
  sh->cv.wait(lock, [&] { return sh->done.load() == nchunks; });
}

}  // namespace

static ffi::Error KdaCpuDecodeImpl(ffi::ThreadPool pool, FLASHKDA_DECODE_PARAMS) {
  KdaOptions opt;
  if (auto err = FLASHKDA_DECODE_OPTIONS(opt); !err.success()) return err;
  DecodeDims s;
  if (auto err = flashkda::ParseDecodeOperands(q, k, v, g, beta, a_log, dt_bias, state_indices, state, opt, *o,
                                             *new_state, &s);
      !err.success()) {
    return err;
  }
  if (new_state->untyped_data() != state.untyped_data() && state.size_bytes() > 0) {
    std::memcpy(new_state->untyped_data(), state.untyped_data(), state.size_bytes());
  }
  DecodePtrs p{q.untyped_data(), k.untyped_data(), v.untyped_data(), g.untyped_data(), beta.untyped_data(),
               static_cast<const float*>(a_log.untyped_data()), static_cast<const float*>(dt_bias.untyped_data()),
               s.has_indices ? static_cast<const int32_t*>(state_indices.untyped_data()) : nullptr,
               new_state->untyped_data(), o->untyped_data()};
  switch (s.dtype) {
    case ffi::DataType::F32:
      RunAll<ffi::DataType::F32>(pool, s, opt, p);
      break;
    case ffi::DataType::F64:
      RunAll<ffi::DataType::F64>(pool, s, opt, p);
      break;
    case ffi::DataType::BF16:
      RunAll<ffi::DataType::BF16>(pool, s, opt, p);
      break;
    case ffi::DataType::F16:
      RunAll<ffi::DataType::F16>(pool, s, opt, p);
      break;
    default:
      return ffi::Error::InvalidArgument("flashkda_decode: inputs must be bf16, f16, f32 or f64");
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaDecodeCpu, KdaCpuDecodeImpl,
                              FLASHKDA_DECODE_BINDING(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
