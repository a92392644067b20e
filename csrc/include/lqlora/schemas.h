// Every lqlora operator schema, in one place (extension-cpp's muladd.cpp pattern).
// registry.cpp defines them as lqlora::* for lqlora_ext._C; the SIMT emulator module
// (lqlora_ext._emu) defines the same schemas as lqlora_emu::* for the emulated CUDA kernels.
// Backend files only register kernels for their dispatch key with TORCH_LIBRARY_IMPL;
// Python adds fake kernels and autograd in lqlora_ext/ops/.
//
// Packed-tensor arguments (qcodes, qscales, scale2, offset) follow docs/format.md; `levels`
// is the fp32 [2^bits] NormalFloat table (lqlora_ext.nf_code(bits)).
#pragma once
#include <torch/library.h>

namespace lqlora {

inline void define_schemas(torch::Library& m) {
  // w [rows, cols] float32/bf16/fp16 -> (qcodes int32, qscales int32, scale2 scale_dtype,
  // offset float32[1]). Refuses NaN/Inf naming the first bad index.
  m.def(
      "quantize(Tensor w, Tensor levels, int bits, int block_size, int scale_bits, "
      "int scale_block_size, ScalarType scale_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  // Double-quantized scales -> fp32 first-level scales [nblocks].
  m.def(
      "unpack_scales(Tensor qscales, Tensor scale2, Tensor offset, int nblocks, "
      "int scale_bits, int scale_block_size) -> Tensor");
  // Packed weight -> dense [rows, cols] in `dtype`.
  m.def(
      "dequantize(Tensor qcodes, Tensor qscales, Tensor scale2, Tensor offset, Tensor levels, "
      "int rows, int cols, int bits, int block_size, int scale_bits, int scale_block_size, "
      "ScalarType dtype) -> Tensor");
  // x [M, cols] -> x @ W^T (+ lora_scale * (x @ lora_a^T) @ lora_b^T), [M, rows], x's dtype.
  // lora_a [r, cols], lora_b [rows, r], both or neither.
  m.def(
      "qmatmul(Tensor x, Tensor qcodes, Tensor qscales, Tensor scale2, Tensor offset, "
      "Tensor levels, int rows, int bits, int block_size, int scale_bits, "
      "int scale_block_size, Tensor? lora_a, Tensor? lora_b, float lora_scale) -> Tensor");
  // g [M, rows] -> g @ W, [M, cols], g's dtype: the input gradient of qmatmul without a
  // dense weight.
  m.def(
      "qmatmul_t(Tensor g, Tensor qcodes, Tensor qscales, Tensor scale2, Tensor offset, "
      "Tensor levels, int cols, int bits, int block_size, int scale_bits, "
      "int scale_block_size) -> Tensor");
  // Seeded randomized SVD of a [..., m, n] (Halko et al.): U [..., m, rank],
  // S [..., rank], V [..., n, rank]. `init` [..., n, rank + oversample] replaces the
  // Gaussian sketch (warm start from a previous subspace).
  m.def(
      "rsvd(Tensor a, int rank, int oversample, int niter, int seed, Tensor? init) -> "
      "(Tensor, Tensor, Tensor)");
  // rsvd's Gaussian sketch for a [..., m, n]: [..., n, k] in a's dtype on a's device, from
  // `seed` (Philox4x32-10 + Box-Muller, lqlora/gaussian.h): the same bits on every device.
  m.def("rsvd_sketch(Tensor a, int k, int seed) -> Tensor");
}

}  // namespace lqlora
