// CUDA handler of flashkda_fwd: decodes the operands, lays out the workspace, and enqueues the plan, prep
// and recurrence kernels (kda_fwd_common.cuh describes the algorithm); float32 inputs take the float32 recurrence
// instead (kda_fwd_f32.cu: no workspace, nothing saved). Graph safe: no allocation, no host synchronisation, no
// host read of device data; every size is a static bound.
#include <cuda_runtime.h>

#include <string>

#include "kda_bindings.h"
#include "kda_env.h"
#include "kda_fwd_common.cuh"
#include "kda_fwd_launch.h"
#include "kda_fwd_overlap.h"
#include "kda_fwd_params.h"

namespace ffi = xla::ffi;

namespace flashkda {
namespace fwd {
namespace {

ffi::Error CudaError(cudaError_t err, const char* where) {
  return ffi::Error::Internal(std::string("flashkda_fwd: ") + where + ": " + cudaGetErrorString(err));
}

}  // namespace

void SetUpOverlap(Params& p, bool bounded_prep, int nsm) {
  static const bool off = EnvEquals("FLASHKDA_FWD_OVERLAP", "0");  // read once per process
  static const float tail3 = EnvPositive("FLASHKDA_FWD_OVERLAP_TAIL", 0.55f);
  static const float tail1 = EnvPositive("FLASHKDA_FWD_OVERLAP_TAIL1", 0.15f);
  const long long tiles = static_cast<long long>(p.B) * ((p.T + kPlanTile - 1) / kPlanTile);
  const int bv = BlockV(p.K, p.B, p.HV), occ = RecurCtasPerSm(p.K, bv), ncb = p.V / bv;
  // At least one sequence per batch row: the recurrence's SMs are at least B x HV x (column blocks) / (CTAs per SM).
  const long long min_sms = (static_cast<long long>(p.B) * p.HV * ncb + occ - 1) / occ;
  if (off || !bounded_prep || tiles > kOverlapMaxTiles || min_sms > OverlapMaxSms(nsm)) return;
  // [B * T] ints, then tile_chunks, in the upper half of the multi-segment list's B * T * 16 bytes: its entries (split
  // sequences, longer than a segment of >= kSegMinChunks chunks) take at most B * T / 32 bytes of the lower half.
  static_assert(kSegMinChunks * kChunk >= 64, "multi-segment entries fit below the overlap's counters");
  p.ready = reinterpret_cast<int*>(p.multi_list) + 2 * static_cast<size_t>(p.B) * p.T;
  p.tile_chunks = p.ready + static_cast<size_t>(p.B) * p.T;
  p.overlap_nsm = nsm;
  p.overlap_occ = occ;
  p.overlap_ncb = ncb;
  p.overlap_tail = p.split ? tail1 : tail3;
}

namespace {

// Every final state from its initial state (zeros without one), before the kernels overwrite those of the slots
// their sequences reach.
cudaError_t CopyInitialToFinal(const Params& p, int64_t final_bytes, cudaStream_t stream) {
  return p.S_init > 0 ? cudaMemcpyAsync(p.final_state, p.init, final_bytes, cudaMemcpyDeviceToDevice, stream)
                      : cudaMemsetAsync(p.final_state, 0, final_bytes, stream);
}

template <typename TIn>
ffi::Error Run(cudaStream_t stream, Params& p, const Layout& lay, int64_t final_bytes) {
  const int nsm = SmCount();
  cudaError_t err;
  bool bounded = false;
  if constexpr (sizeof(TIn) == 2) bounded = PrepBoundedApplies(p, PrepSolvesOnTensorCores<TIn>());
  SetUpOverlap(p, bounded, nsm);
  if (p.S_final > 0 && !PlanWritesEmptyFinalStates(p)) {  // else the plan fills the slots without tokens
    if ((err = CopyInitialToFinal(p, final_bytes, stream)) != cudaSuccess) return CudaError(err, "final state copy");
  }
  if (p.B == 0 || p.T == 0 || p.HV == 0) return ffi::Error::Success();
  err = LaunchPlan(p, p.HV * p.V * static_cast<int>(sizeof(TIn)), stream);
  if (err != cudaSuccess) return CudaError(err, "plan kernels");
  if ((err = LaunchPrep<TIn>(p, stream, nsm)) != cudaSuccess) return CudaError(err, "prep kernel");
  if (p.split) {
    if ((err = LaunchRecur<TIn>(p, false, stream, nsm)) != cudaSuccess) return CudaError(err, "segment kernel");
    if ((err = LaunchCombine(p, stream, nsm)) != cudaSuccess) return CudaError(err, "combine kernel");
  }
  if ((err = LaunchRecur<TIn>(p, true, stream, nsm)) != cudaSuccess) return CudaError(err, "recurrence kernel");
  return ffi::Error::Success();
}

// float32 inputs (kda_fwd_f32.cu): the final states of slots no sequence reaches come from a copy first.
ffi::Error RunF32(cudaStream_t stream, const Params& p, int64_t final_bytes) {
  cudaError_t err;
  if (p.S_final > 0) {
    if ((err = CopyInitialToFinal(p, final_bytes, stream)) != cudaSuccess) return CudaError(err, "final state copy");
  }
  if ((err = LaunchFwdF32(p, stream)) != cudaSuccess) return CudaError(err, "float32 recurrence kernel");
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fwd
}  // namespace flashkda

static ffi::Error KdaCudaFwdImpl(cudaStream_t stream, FLASHKDA_FWD_PARAMS) {
  using namespace flashkda;
  using namespace flashkda::fwd;
  KdaOptions opt;
  if (auto err = FLASHKDA_DECODE_OPTIONS(opt); err.failure()) return err;
  KdaShape s;
  if (auto err = DecodeShape(q, k, v, g, beta, a_log, dt_bias, slot, initial_state, opt, &s); err.failure()) return err;
  const auto dt = s.dtype;
  if (dt != ffi::DataType::BF16 && dt != ffi::DataType::F16 && dt != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): inputs must be bfloat16, float16 or float32");
  }
  // V = 2 K (K <= 128): context parallelism's run of a slice's values next to K "map" columns (zero values from
  // the identity), flashkda_jax/sharding.py; the public API keeps K == V (_capabilities.CUDA_FWD_HEAD_DIMS).
  const bool kv_ok = s.K == s.V ? (s.K == 64 || s.K == 128 || s.K == 256) : (s.V == 2 * s.K && (s.K == 64 || s.K == 128));
  if (!kv_ok) {
    return ffi::Error::InvalidArgument(
        "flashkda_fwd (CUDA): head dims must satisfy K == V in {64, 128, 256}, or V == 2 K with K in {64, 128}");
  }
  if (s.H * s.K != 0 && q.element_count() != static_cast<size_t>(s.B * s.T * s.H * s.K)) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): bad q shape");
  }
  const int64_t s_final = StateSlots(*final_state, s);
  if (final_state->element_count() > 0 &&
      final_state->element_count() != static_cast<size_t>(s.B * s_final * s.HV * s.K * s.V)) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): final_state has a bad size");
  }
  if (s.has_initial_state && s_final > 0 && s_final != s.S) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): initial and final state must have the same slots");
  }
  if (o->element_count() != static_cast<size_t>(s.B * s.T * s.HV * s.V) || o->element_type() != dt) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): bad output buffer");
  }
  const int64_t final_bytes = static_cast<int64_t>(final_state->size_bytes());
  if (dt == ffi::DataType::F32) {
    if (chunk_states->element_count() > 0 ||
        TotalElements(*saved_qg, *saved_kd, *saved_w, *saved_u, *saved_aqk, *saved_gamma) != 0) {
      return ffi::Error::InvalidArgument(
          "flashkda_fwd (CUDA): float32 inputs run the float32 recurrence, which saves no chunk_states / saved_*; "
          "pass empty buffers");
    }
    Params p = MakeParams(s, opt, Layout{}, nullptr, s_final, q, k, v, g, beta, a_log, dt_bias, slot, initial_state,
                          o->untyped_data(), s_final > 0 ? static_cast<float*>(final_state->untyped_data()) : nullptr);
    return RunF32(stream, p, final_bytes);
  }
  int64_t S = s.S > s_final ? s.S : s_final;
  // Saved prep outputs (for the backward): the prep writes into them instead of the workspace.
  bool prep_ok = true;
  const ffi::AnyBuffer* const saved[6] = {&*saved_qg, &*saved_kd, &*saved_w, &*saved_u, &*saved_aqk, &*saved_gamma};
  const bool save_prep = SavedPrepGiven(s, saved, S, &S, &prep_ok);
  if (!prep_ok) {
    return ffi::Error::InvalidArgument(
        "flashkda_fwd (CUDA): saved_qg / kd / w / u / aqk / gamma must be all empty or bf16 [B, T, HV, K] (x4), bf16 "
        "[B, T, HV, 128] and f32 [B, ceil(T / 64) + S, HV, K] with K == V and S >= the state slots");
  }
  Layout lay = MakeLayout(s.B, s.T, s.HV, s.K, s.V, S, false, save_prep);
  if (workspace->size_bytes() < lay.total) lay = MakeLayout(s.B, s.T, s.HV, s.K, s.V, S, /*no_split=*/true, save_prep);
  if (workspace->size_bytes() < lay.total) {
    return ffi::Error::InvalidArgument("flashkda_fwd (CUDA): workspace too small: " + std::to_string(workspace->size_bytes()) +
                                       " < " + std::to_string(lay.total) + " bytes");
  }
  if (chunk_states->element_count() > 0) {
    // Only the backward's head dims (K == V in {64, 128}); the layout is the backward's Hs.
    if (s.K != s.V || s.K > 128 || !ChunkStatesWellFormed(s, *chunk_states)) {
      return ffi::Error::InvalidArgument(
          "flashkda_fwd (CUDA): chunk_states must be bfloat16 [B, ceil(T / 64) + 1, HV, K, V] with K == V <= 128");
    }
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace->untyped_data());
  Params p = MakeParams(s, opt, lay, ws, s_final, q, k, v, g, beta, a_log, dt_bias, slot, initial_state,
                        o->untyped_data(),
                        s_final > 0 ? static_cast<float*>(final_state->untyped_data()) : nullptr);
  p.chunk_states = chunk_states->element_count() > 0 ? static_cast<__nv_bfloat16*>(chunk_states->untyped_data()) : nullptr;
  p.skip_t = save_prep ? 0 : 1;  // T's rows serve only the backward, which reads them from the saved outputs
  if (save_prep) {
    void* const dst[6] = {saved_qg->untyped_data(), saved_kd->untyped_data(), saved_w->untyped_data(),
                          saved_u->untyped_data(), saved_aqk->untyped_data(), saved_gamma->untyped_data()};
    UseSavedPrep(p, dst);
  }
  if (dt == ffi::DataType::BF16) return Run<__nv_bfloat16>(stream, p, lay, final_bytes);
  return Run<__half>(stream, p, lay, final_bytes);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaFwdCuda, KdaCudaFwdImpl,
                              FLASHKDA_FWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
