// CUDA handler of flashkda_bwd (placeholder until the kernel lands).
#include <cuda_runtime.h>

#include "kda_bindings.h"

namespace ffi = xla::ffi;

static ffi::Error KdaCudaBwdImpl(cudaStream_t stream, FLASHKDA_BWD_PARAMS) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "flashkda_bwd: CUDA kernel not implemented yet");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaBwdCuda, KdaCudaBwdImpl,
                              FLASHKDA_BWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
