// The Python extension: a dict {target name: {platform: capsule}} that flashkda_jax/_ffi.py registers.
#include <nanobind/nanobind.h>

#include "handlers.h"

namespace nb = nanobind;

namespace {

template <typename T>
nb::capsule Capsule(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>, "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

nb::dict Registrations() {
  nb::dict targets;
  auto add = [&](const char* name, nb::capsule cpu, nb::object cuda) {
    nb::dict platforms;
    platforms["cpu"] = cpu;
    if (!cuda.is_none()) platforms["CUDA"] = cuda;
    targets[name] = platforms;
  };
#ifdef FLASHKDA_WITH_CUDA
  add("flashkda_fwd", Capsule(FlashKdaFwdCpu), Capsule(FlashKdaFwdCuda));
  add("flashkda_bwd", Capsule(FlashKdaBwdCpu), Capsule(FlashKdaBwdCuda));
  add("flashkda_decode", Capsule(FlashKdaDecodeCpu), Capsule(FlashKdaDecodeCuda));
#else
  add("flashkda_fwd", Capsule(FlashKdaFwdCpu), nb::none());
  add("flashkda_bwd", Capsule(FlashKdaBwdCpu), nb::none());
  add("flashkda_decode", Capsule(FlashKdaDecodeCpu), nb::none());
#endif
  return targets;
}

}  // namespace

NB_MODULE(_flashkda, m) {
  m.def("registrations", &Registrations, "FFI handler capsules by target name and platform.");
#ifdef FLASHKDA_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
