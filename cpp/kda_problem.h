// Shape and attribute decoding shared by the CPU and CUDA handlers of every KDA op.
//
// The FFI contract (docs/ffi.md has the full table). Every array operand may carry extra leading
// "batch" dimensions (that is how vmap's broadcast_all reaches us); they are flattened into B.
//   q, k           [..., T, H, K]     input dtype X (bf16, f16, f32; f64 on CPU)
//   v              [..., T, HV, V]    X
//   g              [..., T, HV, K]    X   raw gate input (the log-decay itself when gate_mode == 0)
//   beta           [..., T, HV]       X   raw (sigmoid applied in kernel when beta_sigmoid)
//   a_log          [..., HV]          f32 (per batch row; ignored unless use_a_log)
//   dt_bias        [..., HV, K]       f32 (per batch row; zeros when the gate has none)
//   slot           [..., T]           i32 index of the token's sequence in its row (order of appearance),
//                                         -1 for padding. A sequence starts at t where slot[t] >= 0 and
//                                         (t == 0 or slot[t] != slot[t-1]). Sequences with slot >= S
//                                         start from zero and keep no final state.
//   initial_state  [..., S, HV, K, V] (or [..., S, HV, V, K] when state_vk) state dtype; 0 elements = none
// State dtype is f32 (f64 when X is f64). State slots that no sequence reaches are copied through.
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace flashkda {

namespace ffi = xla::ffi;

enum class GateMode : int32_t { kPrecomputed = 0, kSoftplus = 1, kBounded = 2 };

struct KdaOptions {
  // Double so that float64 problems get their exact scale / bound; f32 kernels round them once.
  double scale = 1.0;
  GateMode gate = GateMode::kPrecomputed;
  double lower_bound = -5.0;
  bool use_a_log = false;
  bool qk_l2norm = false;
  bool beta_sigmoid = false;
  bool allow_neg_eigval = false;
  bool state_vk = false;
};

struct KdaShape {
  int64_t B = 0, T = 0, H = 0, HV = 0, K = 0, V = 0, S = 0;
  bool has_initial_state = false;
  ffi::DataType dtype = ffi::DataType::F32;        // q/k/v/g/beta/o dtype
  ffi::DataType state_dtype = ffi::DataType::F32;  // f32, or f64 when dtype is f64
  int64_t group() const { return HV / H; }
};

// Decodes the attributes every op shares.
inline ffi::Error MakeOptions(double scale, int32_t gate_mode, double lower_bound, bool use_a_log,
                              bool qk_l2norm, bool beta_sigmoid, bool allow_neg_eigval, bool state_vk,
                              KdaOptions* out) {
  if (gate_mode < 0 || gate_mode > 2) {
    return ffi::Error::InvalidArgument("flashkda: gate_mode must be 0, 1 or 2");
  }
  out->scale = scale;
  out->gate = static_cast<GateMode>(gate_mode);
  out->lower_bound = lower_bound;
  out->use_a_log = use_a_log;
  out->qk_l2norm = qk_l2norm;
  out->beta_sigmoid = beta_sigmoid;
  out->allow_neg_eigval = allow_neg_eigval;
  out->state_vk = state_vk;
  return ffi::Error::Success();
}

namespace detail {

inline int64_t LeadingCount(ffi::AnyBuffer::Dimensions dims, int trailing) {
  int64_t n = 1;
  for (int64_t i = 0; i + trailing < static_cast<int64_t>(dims.size()); ++i) n *= dims[i];
  return n;
}

inline ffi::Error Mismatch(const char* what) {
  return ffi::Error::InvalidArgument(std::string("flashkda: inconsistent shape of ") + what);
}


}  // namespace detail

// Validates the operands of a forward-like op and derives its problem sizes.
inline ffi::Error DecodeShape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                              const ffi::AnyBuffer& g, const ffi::AnyBuffer& beta,
                              const ffi::AnyBuffer& a_log, const ffi::AnyBuffer& dt_bias,
                              const ffi::AnyBuffer& slot, const ffi::AnyBuffer& initial_state,
                              const KdaOptions& opt, KdaShape* s) {
  auto qd = q.dimensions();
  auto vd = v.dimensions();
  if (qd.size() < 3 || vd.size() < 3) return detail::Mismatch("q/v (rank < 3)");
  const size_t qr = qd.size();
  s->T = qd[qr - 3];
  s->H = qd[qr - 2];
  s->K = qd[qr - 1];
  s->B = detail::LeadingCount(qd, 3);
  const size_t vr = vd.size();
  s->HV = vd[vr - 2];
  s->V = vd[vr - 1];
  if (vd[vr - 3] != s->T || detail::LeadingCount(vd, 3) != s->B) return detail::Mismatch("v");
  if (s->H <= 0 || s->HV % s->H != 0) return ffi::Error::InvalidArgument("flashkda: HV must be a multiple of H");
  if (k.element_count() != q.element_count()) return detail::Mismatch("k");
  if (g.element_count() != static_cast<size_t>(s->B * s->T * s->HV * s->K)) return detail::Mismatch("g");
  if (beta.element_count() != static_cast<size_t>(s->B * s->T * s->HV)) return detail::Mismatch("beta");
  if (a_log.element_count() != static_cast<size_t>(s->B * s->HV)) return detail::Mismatch("a_log");
  if (dt_bias.element_count() != static_cast<size_t>(s->B * s->HV * s->K)) return detail::Mismatch("dt_bias");
  if (slot.element_count() != static_cast<size_t>(s->B * s->T)) return detail::Mismatch("slot");
  s->dtype = q.element_type();
  for (const ffi::AnyBuffer* b : {&k, &v, &g, &beta}) {
    if (b->element_type() != s->dtype) return ffi::Error::InvalidArgument("flashkda: q, k, v, g, beta must share a dtype");
  }
  if (a_log.element_type() != ffi::DataType::F32 || dt_bias.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("flashkda: a_log and dt_bias must be float32");
  }
  if (slot.element_type() != ffi::DataType::S32) return ffi::Error::InvalidArgument("flashkda: slot must be int32");
  s->state_dtype = s->dtype == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  s->has_initial_state = initial_state.element_count() > 0;
  if (s->has_initial_state) {
    if (initial_state.element_type() != s->state_dtype) {
      return ffi::Error::InvalidArgument("flashkda: initial_state must be float32 (float64 for float64 inputs)");
    }
    auto sd = initial_state.dimensions();
    if (sd.size() < 4) return detail::Mismatch("initial_state");
    const size_t sr = sd.size();
    s->S = sd[sr - 4];
    const int64_t a = opt.state_vk ? s->V : s->K, b = opt.state_vk ? s->K : s->V;
    if (sd[sr - 3] != s->HV || sd[sr - 2] != a || sd[sr - 1] != b ||
        detail::LeadingCount(sd, 4) != s->B) {
      return detail::Mismatch("initial_state");
    }
  } else {
    s->S = 0;
  }
  return ffi::Error::Success();
}

// Number of state slots of an optional state buffer [..., S, HV, K, V] (0 when the buffer is empty).
inline int64_t StateSlots(const ffi::AnyBuffer& state, const KdaShape& s) {
  const int64_t per = s.B * s.HV * s.K * s.V;
  if (state.element_count() == 0 || per <= 0) return 0;
  return static_cast<int64_t>(state.element_count()) / per;
}

// Total elements of the given buffers (the optional saved_* / chunk_states groups: 0 = none given).
template <class... Buffers>
inline size_t TotalElements(const Buffers&... bufs) {
  return (size_t{0} + ... + bufs.element_count());
}

// The backward's state-only mode: every input-gradient result (dq, dk, dv, dg, dbeta, da_log_partial,
// ddt_bias_partial) has 0 elements although the problem gives them some, so only dinitial_state is wanted
// (context parallelism needs the gradient w.r.t. a slice's incoming state alone; the CUDA handler then runs
// only the reverse pass).
template <class... Buffers>
inline bool StateOnlyRequested(const KdaShape& s, const Buffers&... grads) {
  const int64_t tok = s.B * s.T;
  const int64_t expected = tok * (2 * s.H * s.K + s.HV * (s.V + s.K + 1)) + s.B * s.HV * (1 + s.K);
  return expected > 0 && ((grads.element_count() == 0) && ...);
}

}  // namespace flashkda

// The attribute list shared by every KDA op's binding, in the order the handlers take them.
#define FLASHKDA_BIND_OPTIONS(binding)          \
  (binding)                                     \
      .Attr<double>("scale")                    \
      .Attr<int32_t>("gate_mode")               \
      .Attr<double>("lower_bound")              \
      .Attr<bool>("use_a_log")                  \
      .Attr<bool>("qk_l2norm")                  \
      .Attr<bool>("beta_sigmoid")               \
      .Attr<bool>("allow_neg_eigval")           \
      .Attr<bool>("state_vk")

#define FLASHKDA_OPTION_PARAMS                                                              \
  double scale, int32_t gate_mode, double lower_bound, bool use_a_log, bool qk_l2norm,     \
      bool beta_sigmoid, bool allow_neg_eigval, bool state_vk

#define FLASHKDA_DECODE_OPTIONS(opt)                                                      \
  ::flashkda::MakeOptions(scale, gate_mode, lower_bound, use_a_log, qk_l2norm, beta_sigmoid, \
                          allow_neg_eigval, state_vk, &(opt))
