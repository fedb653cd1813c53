// Python module deformable_family._C. The operators themselves are registered with TORCH_LIBRARY
// (ms_deform_attn_ops.cpp) when this module is imported; it only adds queries about the build.
#include <torch/extension.h>

namespace {

bool compiled_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_with_cuda", &compiled_with_cuda, "Whether the CUDA kernels of ms_deform_attn were compiled in.");
}
