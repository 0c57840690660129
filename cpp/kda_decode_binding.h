// FFI signature of flashkda_decode, shared by the CPU (cpp/kda_decode_cpu.cc) and CUDA
// (cutlass/kda_decode_cuda.cu) handlers, plus the shape decoding both use.
//
// Operands (every one may carry the same extra leading dimensions "...", e.g. from vmap's broadcast_all;
// they are flattened into L independent groups, each with its own B rows and P pool slots):
//   q, k           [..., B, T, H, K]    X (bf16, f16, f32; f64 on CPU)
//   v              [..., B, T, HV, V]   X
//   g              [..., B, T, HV, K]   X   raw gate input (the log-decay itself when gate_mode == 0)
//   beta           [..., B, T, HV]      X   raw (sigmoid applied in kernel when beta_sigmoid)
//   a_log          [..., HV]            f32 (ignored unless use_a_log)
//   dt_bias        [..., HV, K]         f32 (zeros when the gate has none)
//   state_indices  [..., B] i32, or 0 elements: row b reads/writes state slot state_indices[b]; an index
//                  outside [0, P) (e.g. -1) leaves the pool alone and gives o = 0 for that row. With 0
//                  elements row b uses slot b (then P must equal B).
//   state          [..., P, HV, K, V] (state_vk: [..., P, HV, V, K]) f32 (f64 for f64 inputs)
// Attributes: FLASHKDA_BIND_OPTIONS (kda_problem.h).
// Results:
//   o              [..., B, T, HV, V] X
//   new_state      like state; aliased to the state operand (input_output_aliases {8: 1}), updated in place.
//                  Should XLA ever hand a distinct buffer, the handler copies the state over first.
// Each row's T tokens are applied in order: S <- exp(g) S; S <- S + beta k (v - S^T k)^T; o = S^T (scale q).
// Two rows naming the same valid slot race (the result is unspecified): indices must be unique.
#pragma once

#include <cstdint>

#include "kda_problem.h"

#define FLASHKDA_DECODE_BINDING(binding)                                                       \
  FLASHKDA_BIND_OPTIONS((binding)                                                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* q */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* k */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* v */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* g */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* beta */                           \
                            .Arg<::xla::ffi::AnyBuffer>() /* a_log */                          \
                            .Arg<::xla::ffi::AnyBuffer>() /* dt_bias */                        \
                            .Arg<::xla::ffi::AnyBuffer>() /* state_indices (0 elements = none) */ \
                            .Arg<::xla::ffi::AnyBuffer>() /* state */)                         \
      .Ret<::xla::ffi::AnyBuffer>() /* o */                                                    \
      .Ret<::xla::ffi::AnyBuffer>() /* new_state (aliases state) */

#define FLASHKDA_DECODE_PARAMS                                                                  \
  ::xla::ffi::AnyBuffer q, ::xla::ffi::AnyBuffer k, ::xla::ffi::AnyBuffer v,                    \
      ::xla::ffi::AnyBuffer g, ::xla::ffi::AnyBuffer beta, ::xla::ffi::AnyBuffer a_log,         \
      ::xla::ffi::AnyBuffer dt_bias, ::xla::ffi::AnyBuffer state_indices,                       \
      ::xla::ffi::AnyBuffer state, FLASHKDA_OPTION_PARAMS,                                      \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> o,                                              \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> new_state

namespace flashkda {

struct DecodeDims {
  int64_t L = 1;   // independent groups (flattened leading dims)
  int64_t B = 0;   // rows per group
  int64_t T = 0;   // tokens per row
  int64_t H = 0, HV = 0, K = 0, V = 0;
  int64_t P = 0;   // state slots per group
  bool has_indices = false;
  ffi::DataType dtype = ffi::DataType::F32;
  ffi::DataType state_dtype = ffi::DataType::F32;
  int64_t group() const { return HV / H; }
  int64_t rows() const { return L * B; }
  int64_t state_elems() const { return K * V; }
};

// Validates the operands of flashkda_decode and derives its sizes.
inline ffi::Error ParseDecodeOperands(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                    const ffi::AnyBuffer& v, const ffi::AnyBuffer& g,
                                    const ffi::AnyBuffer& beta, const ffi::AnyBuffer& a_log,
                                    const ffi::AnyBuffer& dt_bias, const ffi::AnyBuffer& state_indices,
                                    const ffi::AnyBuffer& state, const KdaOptions& opt,
                                    const ffi::AnyBuffer& o, const ffi::AnyBuffer& new_state,
                                    DecodeDims* s) {
  auto qd = q.dimensions();
  auto vd = v.dimensions();
  auto sd = state.dimensions();
  if (qd.size() < 4 || vd.size() != qd.size()) return detail::Mismatch("q/v (decode needs [..., B, T, H, K])");
  if (sd.size() != qd.size()) return detail::Mismatch("state (rank must match q's)");
  const size_t r = qd.size();
  s->B = qd[r - 4];
  s->T = qd[r - 3];
  s->H = qd[r - 2];
  s->K = qd[r - 1];
  s->L = detail::LeadingCount(qd, 4);
  s->HV = vd[r - 2];
  s->V = vd[r - 1];
  if (vd[r - 4] != s->B || vd[r - 3] != s->T || detail::LeadingCount(vd, 4) != s->L) return detail::Mismatch("v");
  if (s->H <= 0 || s->HV % s->H != 0) return ffi::Error::InvalidArgument("flashkda_decode: HV must be a multiple of H");
  const int64_t rows = s->L * s->B;
  if (k.element_count() != q.element_count()) return detail::Mismatch("k");
  if (g.element_count() != static_cast<size_t>(rows * s->T * s->HV * s->K)) return detail::Mismatch("g");
  if (beta.element_count() != static_cast<size_t>(rows * s->T * s->HV)) return detail::Mismatch("beta");
  if (a_log.element_count() != static_cast<size_t>(s->L * s->HV)) return detail::Mismatch("a_log");
  if (dt_bias.element_count() != static_cast<size_t>(s->L * s->HV * s->K)) return detail::Mismatch("dt_bias");
  s->dtype = q.element_type();
  for (const ffi::AnyBuffer* b : {&k, &v, &g, &beta}) {
    if (b->element_type() != s->dtype) {
      return ffi::Error::InvalidArgument("flashkda_decode: q, k, v, g, beta must share a dtype");
    }
  }
  if (a_log.element_type() != ffi::DataType::F32 || dt_bias.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("flashkda_decode: a_log and dt_bias must be float32");
  }
  s->state_dtype = s->dtype == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (state.element_type() != s->state_dtype || new_state.element_type() != s->state_dtype) {
    return ffi::Error::InvalidArgument("flashkda_decode: state must be float32 (float64 for float64 inputs)");
  }
  s->P = sd[r - 4];
  const int64_t a = opt.state_vk ? s->V : s->K, b = opt.state_vk ? s->K : s->V;
  if (sd[r - 3] != s->HV || sd[r - 2] != a || sd[r - 1] != b || detail::LeadingCount(sd, 4) != s->L) {
    return detail::Mismatch("state");
  }
  if (new_state.element_count() != state.element_count()) return detail::Mismatch("new_state");
  s->has_indices = state_indices.element_count() > 0;
  if (s->has_indices) {
    if (state_indices.element_type() != ffi::DataType::S32) {
      return ffi::Error::InvalidArgument("flashkda_decode: state_indices must be int32");
    }
    if (state_indices.element_count() != static_cast<size_t>(rows)) return detail::Mismatch("state_indices");
  } else if (s->P != s->B && rows > 0) {
    return ffi::Error::InvalidArgument("flashkda_decode: without state_indices the state needs one slot per row");
  }
  if (o.element_count() != v.element_count() || o.element_type() != s->dtype) return detail::Mismatch("o");
  return ffi::Error::Success();
}

}  // namespace flashkda
