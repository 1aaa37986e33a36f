// The Python module object of a compiled extension. It exports nothing: importing it loads the
// shared library, whose TORCH_LIBRARY blocks register the operators under torch.ops.slsdeep_kernels.
// Built twice, with SLSDEEP_MODULE=_C (CPU) and SLSDEEP_MODULE=_C_cuda (CUDA).
#include <Python.h>

#define SLSDEEP_CONCAT_(a, b) a##b
#define SLSDEEP_CONCAT(a, b) SLSDEEP_CONCAT_(a, b)
#define SLSDEEP_STRING_(a) #a
#define SLSDEEP_STRING(a) SLSDEEP_STRING_(a)

extern "C" PyMODINIT_FUNC SLSDEEP_CONCAT(PyInit_, SLSDEEP_MODULE)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, SLSDEEP_STRING(SLSDEEP_MODULE), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
