// Launchers of the flashkda_fwd kernels (each kernel family lives in its own translation unit).
#pragma once

#include <cuda_runtime.h>

#include "kda_fwd_common.cuh"

namespace flashkda {
namespace fwd {

// Intra-chunk preparation; TIn is the input dtype.
template <typename TIn>
cudaError_t LaunchPrep(const Params& p, cudaStream_t stream, int nsm);

// Chunk recurrence: phase3 = true writes outputs and final states; false computes segment maps (phase 1).
template <typename TOut>
cudaError_t LaunchRecur(const Params& p, bool phase3, cudaStream_t stream, int nsm);

// Composition of segment maps (phase 2).
cudaError_t LaunchCombine(const Params& p, cudaStream_t stream, int nsm);

}  // namespace fwd
}  // namespace flashkda
