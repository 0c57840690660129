// CPU handler of flashkda_bwd (placeholder until the kernel lands).
#include "kda_bindings.h"

namespace ffi = xla::ffi;

static ffi::Error KdaCpuBwdImpl(ffi::ThreadPool pool, FLASHKDA_BWD_PARAMS) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "flashkda_bwd: CPU kernel not implemented yet");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaBwdCpu, KdaCpuBwdImpl,
                              FLASHKDA_BWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
