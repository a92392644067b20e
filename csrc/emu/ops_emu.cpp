// The CUDA glue (csrc/cuda/ops_cuda.cpp) compiled for the emulator: LQLORA_EMU is defined
// for the whole lqlora_ext._emu target, and backend.h turns the glue into lqlora_emu::* on
// CPU tensors. Everything else - argument checks, path choice, chunking, LoRA handling -
// is the very code the GPU build runs.
#include "../cuda/ops_cuda.cpp"
