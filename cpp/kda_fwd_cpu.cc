// CPU handler of flashkda_fwd (placeholder until the kernel lands).
#include "kda_bindings.h"

namespace ffi = xla::ffi;

static ffi::Error KdaCpuFwdImpl(ffi::ThreadPool pool, FLASHKDA_FWD_PARAMS) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "flashkda_fwd: CPU kernel not implemented yet");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashKdaFwdCpu, KdaCpuFwdImpl,
                              FLASHKDA_FWD_BINDING(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
