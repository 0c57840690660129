// Every FFI handler symbol the extension exports; module.cc hands them to Python as capsules.
#pragma once

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashKdaFwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashKdaBwdCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashKdaDecodeCpu);

#ifdef FLASHKDA_WITH_CUDA
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashKdaFwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashKdaBwdCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(FlashKdaDecodeCuda);
#endif
