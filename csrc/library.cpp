// The mamlfast operators (namespace mamlfast): one schema each, implemented per device by
// batch_norm_cpu.cpp, lslr_cpu.cpp and max_pool_cpu.cpp (CPU) and by bindings.cpp (CUDA; max
// pooling has no CUDA kernels), so that torch.ops.mamlfast.* pick the kernel by the tensors'
// device and torch.library.opcheck can check them. The module mamlfast._C loads this library and
// holds the functions of the CPU memory pool (memory_pool_cpu.cpp), which take no tensors.
// The batch norm's `variant` picks the CUDA kernels' shape (kernels.h: BatchNormVariant, 0 or 1), for
// benchmarks to compare; the CPU kernels have one shape.

#include <Python.h>
#include <torch/library.h>

#include "memory_pool.h"

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

namespace {

PyObject* enable_memory_pool(PyObject*, PyObject*) { return PyBool_FromLong(mamlfast::cpu::enable_memory_pool()); }

PyObject* memory_pool_stats(PyObject*, PyObject*) {
  const auto stats = mamlfast::cpu::memory_pool_stats();
  return Py_BuildValue("(nnn)", static_cast<Py_ssize_t>(stats.reserved), static_cast<Py_ssize_t>(stats.allocated),
                       static_cast<Py_ssize_t>(stats.segments));
}

PyObject* release_memory_pool(PyObject*, PyObject*) {
  return PyLong_FromSize_t(mamlfast::cpu::release_memory_pool());
}

PyMethodDef functions[] = {
    {"enable_memory_pool", enable_memory_pool, METH_NOARGS,
     "Install the CPU memory pool as c10's CPU allocator (once); whether it is the allocator now."},
    {"memory_pool_stats", memory_pool_stats, METH_NOARGS, "(bytes mapped, bytes handed out, segments)"},
    {"release_memory_pool", release_memory_pool, METH_NOARGS, "Unmap the segments that hold no tensor; the bytes."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// Importing the module loads the library, whose static initialisers register the operators.
PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "mamlfast's compiled kernels, as torch.ops.mamlfast.*",
                               -1, functions};
  return PyModule_Create(&module);
}
