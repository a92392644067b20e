// Shared description of one NFTensor's geometry (docs/format.md) and the argument checks
// every backend runs before touching memory. Host-only.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "lqlora/pack.h"

namespace lqlora {

struct NFLayout {
  int64_t rows, cols;       // logical weight shape [rows, cols]
  int64_t numel;            // rows * cols
  int bits;                 // b: bits per weight code
  int64_t block_size;       // B0: weights per first-level scale
  int scale_bits;           // b0: bits per first-level scale code
  int64_t scale_block_size; // B1: first-level scales per second-level scale
  int64_t nblocks() const { return (numel + block_size - 1) / block_size; }
  int64_t ngroups() const { return (nblocks() + scale_block_size - 1) / scale_block_size; }
  int64_t code_words() const { return packed_words(numel, bits); }
  int64_t scale_words() const { return packed_words(nblocks(), scale_bits); }
};

inline void check_config(int64_t bits, int64_t block_size, int64_t scale_bits,
                         int64_t scale_block_size) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "lqlora: bits must be in 2..8, got ", bits);
  TORCH_CHECK_VALUE(block_size == 16 || block_size == 32 || block_size == 64 ||
                        block_size == 128 || block_size == 256,
                    "lqlora: block_size must be one of 16, 32, 64, 128, 256, got ", block_size);
  TORCH_CHECK_VALUE(scale_bits == 2 || scale_bits == 3 || scale_bits == 4 || scale_bits == 8,
                    "lqlora: scale_bits must be one of 2, 3, 4, 8, got ", scale_bits);
  TORCH_CHECK_VALUE(scale_block_size == 16 || scale_block_size == 64 || scale_block_size == 256,
                    "lqlora: scale_block_size must be one of 16, 64, 256, got ", scale_block_size);
}

inline NFLayout make_layout(int64_t rows, int64_t cols, int64_t bits, int64_t block_size,
                            int64_t scale_bits, int64_t scale_block_size) {
  check_config(bits, block_size, scale_bits, scale_block_size);
  TORCH_CHECK_VALUE(rows > 0 && cols > 0, "lqlora: weight shape must be non-empty, got [", rows,
                    ", ", cols, "]");
  TORCH_CHECK_VALUE(rows * cols < (int64_t(1) << 31),
                    "lqlora: weights with 2^31 or more elements are not supported, got [", rows,
                    ", ", cols, "]");
  return NFLayout{rows, cols, rows * cols, static_cast<int>(bits), block_size,
                  static_cast<int>(scale_bits), scale_block_size};
}

// Checks the four packed tensors (and the level table) against the layout: dtype, length,
// device, contiguity. Every kernel calls this first so a mismatched NFTensor is an error,
// never an out-of-bounds read.
inline void check_packed(const NFLayout& L, const at::Tensor& qcodes, const at::Tensor& qscales,
                         const at::Tensor& scale2, const at::Tensor& offset,
                         const at::Tensor& levels) {
  auto dev = qcodes.device();
  auto chk = [&](const at::Tensor& t, const char* name, at::ScalarType dt, int64_t len) {
    TORCH_CHECK_TYPE(t.scalar_type() == dt, "lqlora: ", name, " must be ", dt, ", got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() == len, "lqlora: ", name,
                      " must be 1-D with ", len, " elements for this shape/config, got shape ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.device() == dev, "lqlora: ", name, " is on ", t.device(),
                      " but qcodes is on ", dev);
    TORCH_CHECK_VALUE(t.is_contiguous(), "lqlora: ", name, " must be contiguous");
  };
  chk(qcodes, "qcodes", at::kInt, L.code_words());
  chk(qscales, "qscales", at::kInt, L.scale_words());
  TORCH_CHECK_TYPE(scale2.scalar_type() == at::kFloat || scale2.scalar_type() == at::kHalf ||
                       scale2.scalar_type() == at::kBFloat16,
                   "lqlora: scale2 must be float32, float16 or bfloat16, got ",
                   scale2.scalar_type());
  chk(scale2, "scale2", scale2.scalar_type(), L.ngroups());
  chk(offset, "offset", at::kFloat, 1);
  chk(levels, "levels", at::kFloat, int64_t(1) << L.bits);
}

// The NormalFloat level table: fp32 [2^bits] on the weight's device.
inline void check_levels(const at::Tensor& levels, int64_t bits, const at::Device& dev) {
  TORCH_CHECK_TYPE(levels.scalar_type() == at::kFloat, "lqlora: levels must be float32, got ",
                   levels.scalar_type());
  TORCH_CHECK_VALUE(levels.dim() == 1 && levels.numel() == (int64_t(1) << bits),
                    "lqlora: levels must have 2^bits = ", int64_t(1) << bits,
                    " entries, got shape ", levels.sizes());
  TORCH_CHECK_VALUE(levels.device() == dev, "lqlora: levels is on ", levels.device(),
                    " but the weight is on ", dev);
}

// An activation-like operand of qmatmul/qmatmul_t (x, g, lora_a, lora_b): fp32/bf16/fp16,
// 2-D, on the packed weight's device.
inline void check_activation(const at::Tensor& x, const at::Tensor& qcodes, const char* name,
                             const char* op) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   "lqlora.", op, ": ", name, " must be float32, bfloat16 or float16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "lqlora.", op, ": ", name, " must be 2-D [M, K], got ",
                    x.dim(), "-D");
  TORCH_CHECK_VALUE(x.device() == qcodes.device(), "lqlora.", op, ": ", name, " is on ",
                    x.device(), " but the packed weight is on ", qcodes.device());
}

// make_layout + check_packed for an op that got the packed weight plus the logical shape
// (cols taken from the activation): the common entry check of dequantize/qmatmul/qmatmul_t.
inline NFLayout checked_layout(const at::Tensor& qcodes, const at::Tensor& qscales,
                               const at::Tensor& scale2, const at::Tensor& offset,
                               const at::Tensor& levels, int64_t rows, int64_t cols,
                               int64_t bits, int64_t block_size, int64_t scale_bits,
                               int64_t scale_block_size, const char* op) {
  const NFLayout L = make_layout(rows, cols, bits, block_size, scale_bits, scale_block_size);
  TORCH_CHECK_VALUE(qcodes.numel() == L.code_words(), "lqlora.", op,
                    ": the input's inner size does not match the packed weight: a [", rows,
                    ", ", cols, "] NF", bits, " weight has ", L.code_words(),
                    " code words, qcodes has ", qcodes.numel());
  check_packed(L, qcodes, qscales, scale2, offset, levels);
  return L;
}

// Arguments of unpack_scales: dtypes and lengths agree with nblocks, one device.
inline void check_scale_args(const at::Tensor& qscales, const at::Tensor& scale2,
                             const at::Tensor& offset, int64_t nblocks, int64_t scale_bits,
                             int64_t scale_block_size) {
  check_config(2, 64, scale_bits, scale_block_size);
  TORCH_CHECK_VALUE(nblocks > 0, "lqlora.unpack_scales: nblocks must be positive");
  TORCH_CHECK_TYPE(qscales.scalar_type() == at::kInt && offset.scalar_type() == at::kFloat,
                   "lqlora.unpack_scales: qscales must be int32 and offset float32");
  TORCH_CHECK_VALUE(qscales.numel() == packed_words(nblocks, static_cast<int>(scale_bits)) &&
                        scale2.numel() == (nblocks + scale_block_size - 1) / scale_block_size &&
                        offset.numel() == 1,
                    "lqlora.unpack_scales: packed scale tensors do not match nblocks=", nblocks);
  TORCH_CHECK_VALUE(qscales.device() == scale2.device() && qscales.device() == offset.device(),
                    "lqlora.unpack_scales: qscales, scale2 and offset must be on one device");
}

}  // namespace lqlora
