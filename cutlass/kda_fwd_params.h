// Host side: fills fwd::Params (problem, options, operands, workspace pointers) from the decoded FFI
// operands. Shared by the forward handler and the backward handler (which reuses the forward's prep).
#pragma once

#include "kda_fwd_common.cuh"
#include "kda_problem.h"

namespace flashkda {
namespace fwd {

// The prep outputs saved for the backward (the FFI ops' saved_qg, saved_kd, saved_w, saved_u, saved_aqk,
// saved_gamma, in that order; docs/ffi.md). K == V only: the first four bf16 [B, T, HV, K], saved_aqk bf16
// [B, T, HV, 128] (kAqkPitch: A_qk rows | T rows), saved_gamma f32 [B, NW + S', HV, K] with S' >= min_slots.
// Returns whether they are given; *ok: none given, or all six well formed (then *slots = S').
inline bool SavedPrepGiven(const KdaShape& s, const ffi::AnyBuffer* const (&b)[6], int64_t min_slots,
                           int64_t* slots, bool* ok) {
  const size_t any = TotalElements(*b[0], *b[1], *b[2], *b[3], *b[4], *b[5]);
  *ok = any == 0;
  if (any == 0) return false;
  const int64_t nw = (s.T + kChunk - 1) / kChunk, row = s.B * s.HV * s.K;
  const size_t tok = static_cast<size_t>(s.B * s.T * s.HV);
  if (s.K != s.V || row <= 0) return true;
  for (int i = 0; i < 4; ++i) {
    if (b[i]->element_count() != tok * s.K || b[i]->element_type() != ffi::DataType::BF16) return true;
  }
  if (b[4]->element_count() != tok * kAqkPitch || b[4]->element_type() != ffi::DataType::BF16) return true;
  if (b[5]->element_count() % row != 0 || b[5]->element_type() != ffi::DataType::F32) return true;
  *slots = static_cast<int64_t>(b[5]->element_count()) / row - nw;
  *ok = *slots >= min_slots;
  return true;
}

// Whether a given chunk_states buffer (the backward's Hs) has its shape and dtype: bf16 [B, NW + 1, HV, K, V].
inline bool ChunkStatesWellFormed(const KdaShape& s, const ffi::AnyBuffer& b) {
  const size_t n = static_cast<size_t>(s.B) * ((s.T + kChunk - 1) / kChunk + 1) * s.HV * s.K * s.V;
  return b.element_count() == n && b.element_type() == ffi::DataType::BF16;
}

// Points the prep outputs of p at the saved buffers (SavedPrepGiven's order).
inline void UseSavedPrep(Params& p, void* const (&d)[6]) {
  p.Qg = static_cast<__nv_bfloat16*>(d[0]);
  p.Kd = static_cast<__nv_bfloat16*>(d[1]);
  p.W = static_cast<__nv_bfloat16*>(d[2]);
  p.U = static_cast<__nv_bfloat16*>(d[3]);
  p.Aqk = static_cast<__nv_bfloat16*>(d[4]);
  p.gamma = static_cast<float*>(d[5]);
}

// s_final: final-state slots the prep kernel writes gamma for; o / final_state may be null (backward).
inline Params MakeParams(const KdaShape& s, const KdaOptions& opt, const Layout& lay, unsigned char* ws,
                         int64_t s_final, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
                         const ffi::AnyBuffer& g, const ffi::AnyBuffer& beta, const ffi::AnyBuffer& a_log,
                         const ffi::AnyBuffer& dt_bias, const ffi::AnyBuffer& slot,
                         const ffi::AnyBuffer& initial_state, void* o, float* final_state) {
  Params p{};
  p.B = static_cast<int>(s.B);
  p.T = static_cast<int>(s.T);
  p.H = static_cast<int>(s.H);
  p.HV = static_cast<int>(s.HV);
  p.K = static_cast<int>(s.K);
  p.V = static_cast<int>(s.V);
  p.group = static_cast<int>(s.HV / s.H);
  p.S_init = s.has_initial_state ? static_cast<int>(s.S) : 0;
  p.S_final = static_cast<int>(s_final);
  p.seglen = lay.seglen;
  p.Lseg = lay.seglen * kChunk;
  p.NW = lay.NW;
  p.NG = lay.NG;
  p.NSPLIT = lay.NSPLIT;
  p.split = lay.split;
  p.scale = static_cast<float>(opt.scale);
  p.lower_bound = static_cast<float>(opt.lower_bound);
  p.gate_mode = static_cast<int>(opt.gate);
  p.use_a_log = opt.use_a_log;
  p.qk_l2norm = opt.qk_l2norm;
  p.beta_sigmoid = opt.beta_sigmoid;
  p.allow_neg = opt.allow_neg_eigval;
  p.state_vk = opt.state_vk;
  p.q = q.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.g = g.untyped_data();
  p.beta = beta.untyped_data();
  p.a_log = static_cast<const float*>(a_log.untyped_data());
  p.dt_bias = static_cast<const float*>(dt_bias.untyped_data());
  p.slot = static_cast<const int*>(slot.untyped_data());
  p.init = s.has_initial_state ? static_cast<const float*>(initial_state.untyped_data()) : nullptr;
  p.o = o;
  p.final_state = final_state;
  p.Qg = reinterpret_cast<__nv_bfloat16*>(ws + lay.qg);
  p.Kd = reinterpret_cast<__nv_bfloat16*>(ws + lay.kd);
  p.W = reinterpret_cast<__nv_bfloat16*>(ws + lay.w);
  p.U = reinterpret_cast<__nv_bfloat16*>(ws + lay.u);
  p.Aqk = reinterpret_cast<__nv_bfloat16*>(ws + lay.aqk);
  p.gamma = reinterpret_cast<float*>(ws + lay.gamma);
  p.HP = reinterpret_cast<float*>(ws + lay.hp);
  p.Sstart = reinterpret_cast<float*>(ws + lay.sstart);
  p.seq_start = reinterpret_cast<int*>(ws + lay.seq_start);
  p.seq_end = reinterpret_cast<int*>(ws + lay.seq_end);
  p.chunk_list = reinterpret_cast<int4*>(ws + lay.chunks);
  p.seg_list = reinterpret_cast<int4*>(ws + lay.segs);
  p.multi_list = reinterpret_cast<int4*>(ws + lay.multi);
  p.counters = reinterpret_cast<int*>(ws + lay.counters);
  return p;
}

}  // namespace fwd
}  // namespace flashkda
