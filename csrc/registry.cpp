// lqlora_ext._C's entry point and the lqlora:: operator namespace. The schemas themselves
// live in lqlora/schemas.h (shared with the emulator module's lqlora_emu:: namespace).
#include <Python.h>
#include <torch/library.h>

#include "lqlora/schemas.h"

extern "C" {
// Importing lqlora_ext._C loads this library, which runs the registrations below. The
// module itself is empty: every entry point is a torch.ops.lqlora.* operator.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lqlora, m) { lqlora::define_schemas(m); }
