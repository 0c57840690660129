// CUDA handler of flashkda_fwd (placeholder until the kernel lands).
#include <cuda_runtime.h>

#include "kda_bindings.h"

namespace ffi = xla::ffi;

static ffi::Error KdaCudaFwdImpl(cudaStream_t stream, FLASHKDA_FWD_PARAMS) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "flashkda_fwd: CUDA kernel not implemented yet");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaFwdCuda, KdaCudaFwdImpl,
                              FLASHKDA_FWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
                              {ffi::Traits::kCmdBufferCompatible});
