// Registers the op with the PyTorch dispatcher as torch.ops.deformable_family.ms_deform_attn (and
// its backward). Autograd and the fake (meta) implementations used by torch.compile and torch.export
// are registered from Python in deformable_family/layers/ms_deform_attn_op.py.
#include <torch/library.h>

#include "ms_deform_attn.h"

TORCH_LIBRARY(deformable_family, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deformable_family, CPU, m) {
  m.impl("ms_deform_attn", &deformable_family::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &deformable_family::ms_deform_attn_backward_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(deformable_family, CUDA, m) {
  m.impl("ms_deform_attn", &deformable_family::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &deformable_family::ms_deform_attn_backward_cuda);
}
#endif
