// The mamlfast operators (namespace mamlfast): one schema each, implemented per device by
// batch_norm_cpu.cpp, lslr_cpu.cpp and max_pool_cpu.cpp (CPU) and by bindings.cpp (CUDA; max
// pooling has no CUDA kernels), so that torch.ops.mamlfast.* pick the kernel by the tensors'
// device and torch.library.opcheck can check them. The module mamlfast._C exists only to load this library.
// The batch norm's `variant` picks the CUDA kernels' shape (kernels.h: BatchNormVariant, 0 or 1), for
// benchmarks to compare; the CPU kernels have one shape.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mamlfast, m) {
  m.def("batch_norm_forward(Tensor x, Tensor weight, Tensor bias, float eps, int variant=0) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, int variant=0) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("batch_norm_double_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
        "Tensor gg_x, Tensor gg_weight, Tensor gg_bias, int variant=0) -> (Tensor, Tensor, Tensor)");
  m.def("segment_axpy(Tensor x, Tensor s, Tensor segment, Tensor? base) -> Tensor");
  m.def("segment_dot(Tensor x, Tensor y, Tensor segment, int segments) -> Tensor");
  m.def("max_pool2x2_forward(Tensor x) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor argmax, int height, int width) -> Tensor");
  m.def("max_pool2x2_double_backward(Tensor gg_x, Tensor argmax) -> Tensor");
}

// An empty module: importing it loads the library, whose static initialisers register the operators.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mamlfast's compiled kernels, as torch.ops.mamlfast.*",
                               -1, nullptr};
  return PyModule_Create(&module);
}
