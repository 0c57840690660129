// Launchers of the flashkda_fwd kernels (each kernel family lives in its own translation unit), also used
// by flashkda_bwd, and the host helpers both share.
#pragma once

#include <cuda_runtime.h>

#include "kda_fwd_common.cuh"

namespace flashkda {
namespace fwd {

// Plan (kda_plan.cu): seq_start / seq_end of every token, then the work lists in p.counters order. The
// forward's: chunk, segment and split-sequence lists, and zeroes the out_token_bytes of o of every padding
// token. The backward's (LaunchPlanSeqs): the chunk list and the sequences (b, start, end, slot) in seq_list.
// p.counters must be zero.
cudaError_t LaunchPlan(const Params& p, int out_token_bytes, cudaStream_t stream);
// Whether LaunchPlan also writes the final state of every slot without tokens (its initial state, or zeros), so that
// the handler need not copy all initial states first: final states wanted, with a flag per (row, slot) fitting the
// plan's [B, T] scratch, and some work.
inline bool PlanWritesEmptyFinalStates(const Params& p) {
  return p.S_final > 0 && p.S_final <= p.T && p.B > 0 && p.HV > 0;
}
cudaError_t LaunchPlanSeqs(const Params& p, int4* seq_list, cudaStream_t stream);

// Intra-chunk preparation; TIn is the input dtype.
template <typename TIn>
cudaError_t LaunchPrep(const Params& p, cudaStream_t stream, int nsm);
// The prep for bounded gates (kda_fwd_prep_bounded.cu; bf16 / fp16 inputs), which LaunchPrep picks for 2-byte
// inputs where PrepBoundedApplies: gate "bounded" with lower_bound >= kBoundedPrepMinBound, K in {64, 128}, the
// tensor-core solve, and FLASHKDA_FWD_PREP not "general".
constexpr float kBoundedPrepMinBound = -8.f;
bool PrepBoundedApplies(const Params& p, bool mma_solve);
template <typename TIn>
cudaError_t LaunchPrepBounded(const Params& p, cudaStream_t stream, int nsm);
// Whether LaunchPrep<TIn> solves on tensor cores, i.e. writes T next to A_qk (kAqkPitch). Host only.
template <typename TIn>
bool PrepSolvesOnTensorCores();

// Chunk recurrence: phase3 = true writes outputs and final states; false computes segment maps (phase 1).
template <typename TOut>
cudaError_t LaunchRecur(const Params& p, bool phase3, cudaStream_t stream, int nsm);

// The forward of float32 inputs (kda_fwd_f32.cu): the token recurrence in float32 on the CUDA cores, writing o and
// the final states of the slots its sequences reach (the caller fills the others first); no plan, workspace or
// saved outputs.
cudaError_t LaunchFwdF32(const Params& p, cudaStream_t stream);

// Composition of segment maps (phase 2).
cudaError_t LaunchCombine(const Params& p, cudaStream_t stream, int nsm);

// Multiprocessors of the current device (cached per device; 132 where the query fails).
inline int SmCount() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  static int cached[64] = {0};
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int n = 132;
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  if (dev >= 0 && dev < 64) cached[dev] = n;
  return n;
}

// Enqueues a persistent kernel of kBlock threads (default kThreads) and smem bytes of dynamic shared memory on
// nsm * (its resident CTAs per SM) * waves CTAs, at most items and at least one. programmatic: as the previous
// kernel's programmatic dependent (it may start once every CTA of that kernel has run griddepcontrol.launch_dependents).
template <int kBlock = kThreads, typename Kern, typename KParams>
cudaError_t LaunchGrid(Kern kernel, size_t smem, long long items, int waves, const KParams& p, cudaStream_t stream,
                       int nsm, bool programmatic = false) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  int occ = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, kBlock, smem);
  if (occ < 1) occ = 1;
  long long grid = static_cast<long long>(nsm) * occ * waves;
  if (grid > items) grid = items;
  if (grid < 1) grid = 1;
  if (programmatic) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(grid));
    cfg.blockDim = dim3(kBlock);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, kernel, p);
  }
  kernel<<<static_cast<int>(grid), kBlock, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace fwd
}  // namespace flashkda
