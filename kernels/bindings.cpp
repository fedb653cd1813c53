// Python module deformable_family._C. The operators themselves are registered with TORCH_LIBRARY.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
