// FFI signatures of the KDA ops, shared by the CPU and CUDA handler definitions so that both platforms
// bind exactly the same operands, attributes and results (docs/ffi.md).
#pragma once

#include "kda_problem.h"

// Forward: q, k, v, g, beta, a_log, dt_bias, slot, initial_state -> o, final_state, chunk_states, saved_qg,
// saved_kd, saved_w, saved_u, saved_aqk, saved_gamma, workspace.
// The chunk_states / saved_* results (CUDA only; 0 elements = not wanted): what the CUDA backward would
// otherwise recompute (the chunk start states and the prep kernel's outputs), saved for it (docs/ffi.md).
// The backward takes them back as operands of the same names.
#define FLASHKDA_FWD_BINDING(binding)                                                          \
  FLASHKDA_BIND_OPTIONS((binding)                                                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* q */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* k */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* v */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* g */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* beta */                           \
                            .Arg<::xla::ffi::AnyBuffer>() /* a_log */                          \
                            .Arg<::xla::ffi::AnyBuffer>() /* dt_bias */                        \
                            .Arg<::xla::ffi::AnyBuffer>() /* slot */                           \
                            .Arg<::xla::ffi::AnyBuffer>() /* initial_state */)                 \
      .Ret<::xla::ffi::AnyBuffer>() /* o */                                                    \
      .Ret<::xla::ffi::AnyBuffer>() /* final_state (0 elements = not wanted) */                \
      .Ret<::xla::ffi::AnyBuffer>() /* chunk_states (0 elements = not wanted) */               \
      .Ret<::xla::ffi::AnyBuffer>() /* saved_qg (0 elements = not wanted) */                   \
      .Ret<::xla::ffi::AnyBuffer>() /* saved_kd (0 elements = not wanted) */                   \
      .Ret<::xla::ffi::AnyBuffer>() /* saved_w (0 elements = not wanted) */                    \
      .Ret<::xla::ffi::AnyBuffer>() /* saved_u (0 elements = not wanted) */                    \
      .Ret<::xla::ffi::AnyBuffer>() /* saved_aqk (0 elements = not wanted) */                  \
      .Ret<::xla::ffi::AnyBuffer>() /* saved_gamma (0 elements = not wanted) */                \
      .Ret<::xla::ffi::AnyBuffer>() /* workspace (u8) */

#define FLASHKDA_FWD_PARAMS                                                                     \
  ::xla::ffi::AnyBuffer q, ::xla::ffi::AnyBuffer k, ::xla::ffi::AnyBuffer v,                    \
      ::xla::ffi::AnyBuffer g, ::xla::ffi::AnyBuffer beta, ::xla::ffi::AnyBuffer a_log,         \
      ::xla::ffi::AnyBuffer dt_bias, ::xla::ffi::AnyBuffer slot,                                \
      ::xla::ffi::AnyBuffer initial_state, FLASHKDA_OPTION_PARAMS,                              \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> o,                                              \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> final_state,                                    \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> chunk_states,                                   \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> saved_qg,                                       \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> saved_kd,                                       \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> saved_w,                                        \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> saved_u,                                        \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> saved_aqk,                                      \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> saved_gamma,                                    \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> workspace

// Backward: the forward operands, do, dfinal_state, chunk_states, saved_qg, saved_kd, saved_w, saved_u,
// saved_aqk, saved_gamma (the forward's, or 0 elements: recompute); attribute bwd_window (the CUDA backward's
// token window, 0 = none; the CPU handler ignores it) ->
//   dq, dk, dv, dg (of the raw gate input), dbeta (of the raw beta), da_log_partial [..., HV] f32,
//   ddt_bias_partial [..., HV, K] f32 (both per batch row; Python sums them), dinitial_state, workspace.
#define FLASHKDA_BWD_BINDING(binding)                                                          \
  FLASHKDA_BIND_OPTIONS((binding)                                                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* q */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* k */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* v */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* g */                              \
                            .Arg<::xla::ffi::AnyBuffer>() /* beta */                           \
                            .Arg<::xla::ffi::AnyBuffer>() /* a_log */                          \
                            .Arg<::xla::ffi::AnyBuffer>() /* dt_bias */                        \
                            .Arg<::xla::ffi::AnyBuffer>() /* slot */                           \
                            .Arg<::xla::ffi::AnyBuffer>() /* initial_state */                  \
                            .Arg<::xla::ffi::AnyBuffer>() /* do */                             \
                            .Arg<::xla::ffi::AnyBuffer>() /* dfinal_state (0 elements = none) */  \
                            .Arg<::xla::ffi::AnyBuffer>() /* chunk_states (0 elements = none) */  \
                            .Arg<::xla::ffi::AnyBuffer>() /* saved_qg (0 elements = none) */      \
                            .Arg<::xla::ffi::AnyBuffer>() /* saved_kd (0 elements = none) */      \
                            .Arg<::xla::ffi::AnyBuffer>() /* saved_w (0 elements = none) */       \
                            .Arg<::xla::ffi::AnyBuffer>() /* saved_u (0 elements = none) */       \
                            .Arg<::xla::ffi::AnyBuffer>() /* saved_aqk (0 elements = none) */     \
                            .Arg<::xla::ffi::AnyBuffer>() /* saved_gamma (0 elements = none) */)  \
      .Attr<int64_t>("bwd_window") /* CUDA: tokens per backward window, 0 = none (docs/ffi.md) */ \
      .Ret<::xla::ffi::AnyBuffer>() /* dq */                                                   \
      .Ret<::xla::ffi::AnyBuffer>() /* dk */                                                   \
      .Ret<::xla::ffi::AnyBuffer>() /* dv */                                                   \
      .Ret<::xla::ffi::AnyBuffer>() /* dg */                                                   \
      .Ret<::xla::ffi::AnyBuffer>() /* dbeta */                                                \
      .Ret<::xla::ffi::AnyBuffer>() /* da_log_partial */                                       \
      .Ret<::xla::ffi::AnyBuffer>() /* ddt_bias_partial */                                     \
      .Ret<::xla::ffi::AnyBuffer>() /* dinitial_state (0 elements = none) */                   \
      .Ret<::xla::ffi::AnyBuffer>() /* workspace (u8) */

#define FLASHKDA_BWD_PARAMS                                                                     \
  ::xla::ffi::AnyBuffer q, ::xla::ffi::AnyBuffer k, ::xla::ffi::AnyBuffer v,                    \
      ::xla::ffi::AnyBuffer g, ::xla::ffi::AnyBuffer beta, ::xla::ffi::AnyBuffer a_log,         \
      ::xla::ffi::AnyBuffer dt_bias, ::xla::ffi::AnyBuffer slot,                                \
      ::xla::ffi::AnyBuffer initial_state, ::xla::ffi::AnyBuffer d_o,                           \
      ::xla::ffi::AnyBuffer dfinal_state, ::xla::ffi::AnyBuffer chunk_states, ::xla::ffi::AnyBuffer saved_qg,   \
      ::xla::ffi::AnyBuffer saved_kd, ::xla::ffi::AnyBuffer saved_w, ::xla::ffi::AnyBuffer saved_u,              \
      ::xla::ffi::AnyBuffer saved_aqk, ::xla::ffi::AnyBuffer saved_gamma, FLASHKDA_OPTION_PARAMS, int64_t bwd_window, \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> dq, ::xla::ffi::Result<::xla::ffi::AnyBuffer> dk, \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> dv, ::xla::ffi::Result<::xla::ffi::AnyBuffer> dg, \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> dbeta,                                          \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> da_log_partial,                                 \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> ddt_bias_partial,                               \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> dinitial_state,                                 \
      ::xla::ffi::Result<::xla::ffi::AnyBuffer> workspace
