// CPU handler of flashkda_decode (placeholder until the kernel lands).
#include "kda_bindings.h"

namespace ffi = xla::ffi;

static ffi::Error KdaCpuDecodeImpl(ffi::AnyBuffer x) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "flashkda_decode: not implemented yet");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaDecodeCpu, KdaCpuDecodeImpl, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>());
