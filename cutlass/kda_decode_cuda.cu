// CUDA handler of flashkda_decode (placeholder until the kernel lands).
#include <cuda_runtime.h>

#include "kda_bindings.h"

namespace ffi = xla::ffi;

static ffi::Error KdaCudaDecodeImpl(cudaStream_t stream, ffi::AnyBuffer x) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "flashkda_decode: not implemented yet");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaDecodeCuda, KdaCudaDecodeImpl,
                              ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Arg<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
