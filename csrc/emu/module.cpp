// lqlora_ext._emu: the CUDA kernels of csrc/cuda built for the SIMT emulator, as the
// lqlora_emu::* operators on CPU tensors (same schemas as lqlora::*, lqlora/schemas.h).
// Importing the module runs the registrations; the Python side (lqlora_ext.ops.emu) adds the
// fake kernels and autograd and controls the scheduler through the exported C functions
// of runtime.cpp.
#include <Python.h>
#include <torch/library.h>

#include "lqlora/schemas.h"

extern "C" __attribute__((visibility("default"))) PyObject* PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(lqlora_emu, m) { lqlora::define_schemas(m); }
