// CPU handler of flashkda_fwd: the token-by-token recurrence, vectorised along V.
//
// Work items are (batch row, value head, V-column range); each keeps its K x VB state blocks in cache,
// pre-processes kTc tokens at a time (l2norm, scale, gate, beta, all in the accumulation type), then runs
// the recurrence block by block:
//   S' = diag(a) S;  r = v - S'^T k;  S = S' + beta k r^T;  o = S^T q.
// Accumulation and state are f32 (f64 for f64 inputs).
#include "kda_bindings.h"
#include "kda_cpu_common.h"

namespace ffi = xla::ffi;

namespace {

using namespace flashkda;
using namespace flashkda::cpu;

constexpr int64_t kTc = 64;  // tokens per pre-processing chunk

struct FwdArgs {
  Problem P;
  void* o = nullptr;
  void* fin = nullptr;  // final state or null
  int64_t nsplit = 1;   // V-column ranges per (b, hv)
  int64_t nvb = 1;      // state blocks along V
};

// One token on one K x VB state block. v and o are VB wide (zero padded beyond V).
template <class C, class Acc = typename C::Acc>
FKDA_INLINE void FwdToken(Acc* FKDA_RESTRICT S, int64_t K, const Acc* FKDA_RESTRICT q,
                          const Acc* FKDA_RESTRICT k, const Acc* FKDA_RESTRICT a, Acc beta,
                          const Acc* FKDA_RESTRICT v, Acc* FKDA_RESTRICT o) {
  using V = typename C::V;
  constexpr int W = C::W, R = C::R, VB = C::VB;
  V acc[R];
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = S + i * VB;
    const V ai = VSplat<V>(a[i]);
    const V ki = VSplat<V>(k[i]);
    for (int r = 0; r < R; ++r) {
      V x = VLoad<V>(row + r * W) * ai;
      VStore(row + r * W, x);
      acc[r] += ki * x;
    }
  }
  V u[R];
  const V bv = VSplat<V>(beta);
  for (int r = 0; r < R; ++r) {
    u[r] = (VLoad<V>(v + r * W) - acc[r]) * bv;
    acc[r] = V{};
  }
  for (int64_t i = 0; i < K; ++i) {
    Acc* row = S + i * VB;
    const V ki = VSplat<V>(k[i]);
    const V qi = VSplat<V>(q[i]);
    for (int r = 0; r < R; ++r) {
      V x = VLoad<V>(row + r * W) + ki * u[r];
      VStore(row + r * W, x);
      acc[r] += qi * x;
    }
  }
  for (int r = 0; r < R; ++r) VStore(o + r * W, acc[r]);
}

template <class In, class C>
FKDA_INLINE void FwdTask(const FwdArgs& A, int64_t task) {
  using Acc = typename C::Acc;
  const Problem& P = A.P;
  const KdaShape& s = P.s;
  const int64_t T = s.T, HV = s.HV, K = s.K, V = s.V;
  constexpr int VB = C::VB;
  const int64_t split = task % A.nsplit;
  const int64_t bh = task / A.nsplit;
  const int64_t b = bh / HV, hv = bh % HV;
  const int64_t vb0 = split * A.nvb / A.nsplit, vb1 = (split + 1) * A.nvb / A.nsplit;
  if (vb1 <= vb0) return;
  const int64_t c0 = vb0 * VB, c1 = std::min<int64_t>(V, vb1 * VB);
  const bool vk = P.opt.state_vk;
  const int64_t mat = K * V;

  const Acc* init = static_cast<const Acc*>(P.init);
  Acc* fin = static_cast<Acc*>(A.fin);
  auto init_mat = [&](int64_t sl) -> const Acc* {
    return (init != nullptr && sl >= 0 && sl < P.S_in) ? init + ((b * P.S_in + sl) * HV + hv) * mat : nullptr;
  };
  auto fin_mat = [&](int64_t sl) -> Acc* {
    return (fin != nullptr && sl >= 0 && sl < P.S_out) ? fin + ((b * P.S_out + sl) * HV + hv) * mat : nullptr;
  };

  // Slots that no sequence reaches keep their initial state (zeros without one).
  for (int64_t sl = 0; sl < P.S_out; ++sl) CopyStateCols<Acc>(fin_mat(sl), init_mat(sl), vk, K, V, c0, c1 - c0);

  const int32_t* slot = P.slot + b * T;
  std::vector<uint8_t> flags(T);
  TokenFlags(slot, T, flags.data());

  const int64_t nvl = vb1 - vb0;
  Buf<Acc> qe(kTc * K), ke(kTc * K), ae(kTc * K), be(kTc), ve(kTc * VB), oe(kTc * VB);
  Buf<Acc> state(nvl * K * VB, /*zero=*/true);
  const In* vin = static_cast<const In*>(P.v);
  In* out = static_cast<In*>(A.o);

  for (int64_t t0 = 0; t0 < T; t0 += kTc) {
    const int64_t t1 = std::min(T, t0 + kTc);
    Preprocess<In, Acc>(P, b, hv, t0, t1, flags.data(), qe.data(), ke.data(), ae.data(), be.data());
    for (int64_t vb = vb0; vb < vb1; ++vb) {
      const int64_t cb = vb * VB, nc = std::min<int64_t>(VB, V - cb);
      Acc* Sb = state.data() + (vb - vb0) * K * VB;
      for (int64_t t = t0; t < t1; ++t) {
        Acc* vr = ve.data() + (t - t0) * VB;
        const In* src = vin + ((b * T + t) * HV + hv) * V + cb;
        for (int64_t c = 0; c < nc; ++c) vr[c] = Acc(Cvt<In>::Load(src[c]));
        for (int64_t c = nc; c < VB; ++c) vr[c] = 0;
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j = t - t0;
        const uint8_t f = flags[t];
        Acc* orow = oe.data() + j * VB;
        if (!(f & kValid)) {
          std::fill(orow, orow + VB, Acc(0));
          continue;
        }
        if (f & kStart) LoadStateBlock<Acc>(init_mat(slot[t]), vk, K, V, cb, nc, VB, Sb);
        FwdToken<C>(Sb, K, qe.data() + j * K, ke.data() + j * K, ae.data() + j * K, be[j],
                      ve.data() + j * VB, orow);
        if (f & kEnd) {
          if (Acc* dst = fin_mat(slot[t])) StoreStateBlock<Acc>(dst, vk, K, V, cb, nc, VB, Sb, false);
        }
      }
      for (int64_t t = t0; t < t1; ++t) {
        const Acc* orow = oe.data() + (t - t0) * VB;
        In* dst = out + ((b * T + t) * HV + hv) * V + cb;
        for (int64_t c = 0; c < nc; ++c) dst[c] = Cvt<In>::Store(orow[c]);
      }
    }
  }
}

template <class In, class C> void FwdTaskGeneric(const FwdArgs& A, int64_t t) { FwdTask<In, C>(A, t); }
#if FKDA_X86_DISPATCH
template <class In, class C> FKDA_TARGET_AVX2 void FwdTaskAvx2(const FwdArgs& A, int64_t t) {
  FwdTask<In, C>(A, t);
}
template <class In, class C> FKDA_TARGET_AVX512 void FwdTaskAvx512(const FwdArgs& A, int64_t t) {
  FwdTask<In, C>(A, t);
}
#endif

using TaskFn = void (*)(const FwdArgs&, int64_t);
struct Picked {
  TaskFn fn;
  int VB;
};

template <class In, class Acc> Picked PickFwd() {
#if FKDA_X86_DISPATCH
  switch (CpuLevel()) {
    case 2: { using C = Cfg<Acc, 64, 2>; return Picked{&FwdTaskAvx512<In, C>, C::VB}; }
    case 1: { using C = Cfg<Acc, 32, 4>; return Picked{&FwdTaskAvx2<In, C>, C::VB}; }
    default: break;
  }
#endif
  using C = Cfg<Acc, 16, 4>;
  return Picked{&FwdTaskGeneric<In, C>, C::VB};
}

ffi::Error KdaFwd(ffi::ThreadPool& pool, FLASHKDA_FWD_PARAMS) {
  constexpr const char* op = "flashkda_fwd";
  KdaOptions opt;
  if (auto e = FLASHKDA_DECODE_OPTIONS(opt); e.failure()) return e;
  FwdArgs A;
  if (auto e = SetupProblem(op, q, k, v, g, beta, a_log, dt_bias, slot, initial_state, opt, &A.P); e.failure()) {
    return e;
  }
  Problem& P = A.P;
  const KdaShape& s = P.s;
  if (auto e = CheckResult(op, "o", *o, size_t(s.B * s.T * s.HV * s.V), s.dtype); e.failure()) return e;
  if (auto e = StateBufferSlots(op, "final_state", *final_state, P, &P.S_out); e.failure()) return e;
  if (TotalElements(*chunk_states, *saved_qg, *saved_kd, *saved_w, *saved_u, *saved_aqk, *saved_gamma) != 0) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CPU): chunk_states / saved_* are saved by the CUDA forward "
                                       "only; pass empty buffers");
  }
  A.o = o->untyped_data();
  A.fin = P.S_out > 0 ? final_state->untyped_data() : nullptr;
  if (s.B == 0 || s.HV == 0 || s.V == 0) return ffi::Error::Success();
  if (s.K == 0 || s.T == 0) {
    // Nothing to run: o is zero (K == 0) or empty; final states are copied from the initial ones.
    std::memset(A.o, 0, o->size_bytes());
    if (A.fin != nullptr) {
      if (P.init != nullptr) std::memcpy(A.fin, P.init, final_state->size_bytes());
      else std::memset(A.fin, 0, final_state->size_bytes());
    }
    return ffi::Error::Success();
  }
  return DispatchDtype(op, s.dtype, [&](auto tag) -> ffi::Error {
    using In = typename decltype(tag)::In;
    using Acc = typename decltype(tag)::Acc;
    const Picked picked = PickFwd<In, Acc>();
    const int64_t VB = picked.VB;
    A.nvb = (s.V + VB - 1) / VB;
    int64_t threads = 1;
    try {
      threads = std::max<int64_t>(1, pool.num_threads());
    } catch (...) {
    }
    // Split V across work items only when (b, hv) pairs alone cannot keep the threads busy.
    const int64_t pairs = s.B * s.HV;
    A.nsplit = 1;
    while (A.nsplit < A.nvb && pairs * A.nsplit < 2 * threads) ++A.nsplit;
    TaskFn fn = picked.fn;
    const FwdArgs& args = A;
    return ParallelFor(pool, pairs * A.nsplit, [&args, fn](int64_t i) { fn(args, i); });
  });
}

}  // namespace

static ffi::Error KdaCpuFwdImpl(ffi::ThreadPool pool, FLASHKDA_FWD_PARAMS) {
  return Guard("flashkda_fwd", [&]() {
    return KdaFwd(pool, q, k, v, g, beta, a_log, dt_bias, slot, initial_state, scale, gate_mode, lower_bound,
                  use_a_log, qk_l2norm, beta_sigmoid, allow_neg_eigval, state_vk, o, final_state, chunk_states,
                  saved_qg, saved_kd, saved_w, saved_u, saved_aqk, saved_gamma, workspace);
  });
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaFwdCpu, KdaCpuFwdImpl,
                              FLASHKDA_FWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
