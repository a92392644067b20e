// CUDA kernels of the lqlora:: operators (schemas in csrc/registry.cpp): argument checks,
// allocation, stream and device selection, then the torch-free launchers of launch.h.
// Compiled a second time for the SIMT emulator (backend.h says what differs).
//
// Compiled by the host C++ compiler. It deliberately includes no ATen/cuda or c10/cuda
// header: the current stream comes from the device-generic c10 interface
// (DeviceGuardImplInterface::getStream + getStreamNativeHandle, which for CUDA is the
// cudaStream_t), so the same source builds against the CPU-only torch wheel (CI) and the
// CUDA wheels, and the module needs no libc10_cuda / libtorch_cuda at link time. See
// csrc/README.md.
//
// Large M (> kSmallM) goes through a dequantized temporary and at::mm (cuBLAS at run time).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <optional>

#include "backend.h"
#include "launch.h"
#include "lqlora/format.h"
#include "lqlora/guards.h"

namespace lqlora::cuda {
namespace {

constexpr int64_t kChunkElems = int64_t(1) << 26;  // dequantized rows per at::mm chunk

DType to_dtype(at::ScalarType t, const char* op, const char* what) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "lqlora.", op, ": ", what,
                       " must be float32, float16 or bfloat16, got ", t);
  }
  return DType::kFloat32;  // unreachable
}

// The kernels use 16-byte vector loads: a misaligned view (storage offset) gets a copy.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}



// Validated packed weight + the view the launchers take. Holds the (possibly re-aligned)
// qcodes tensor alive.
struct Packed {
  NFLayout L;
  at::Tensor qcodes;
  PackedView view;
};

Packed make_packed(const at::Tensor& qcodes, const at::Tensor& qscales, const at::Tensor& scale2,
                   const at::Tensor& offset, const at::Tensor& levels, int64_t rows, int64_t cols,
                   int64_t bits, int64_t block_size, int64_t scale_bits,
                   int64_t scale_block_size, const char* op) {
  const NFLayout L = checked_layout(qcodes, qscales, scale2, offset, levels, rows, cols, bits,
                                    block_size, scale_bits, scale_block_size, op);
  TORCH_CHECK_VALUE(on_backend(qcodes), "lqlora.", op, ": expected ", kBackendDevice,
                    " tensors, got qcodes on ", qcodes.device());
  at::Tensor qc = aligned16(qcodes);
  PackedView v{};
  v.qcodes = reinterpret_cast<const uint32_t*>(qc.data_ptr<int32_t>());
  v.qscales = reinterpret_cast<const uint32_t*>(qscales.data_ptr<int32_t>());
  v.scale2 = scale2.data_ptr();
  v.scale2_dtype = to_dtype(scale2.scalar_type(), op, "scale2");
  v.offset = offset.data_ptr<float>();
  v.levels = levels.data_ptr<float>();
  v.rows = rows;
  v.cols = cols;
  v.bits = static_cast<int>(bits);
  v.block_size = static_cast<int>(block_size);
  v.scale_bits = static_cast<int>(scale_bits);
  v.scale_block_size = static_cast<int>(scale_block_size);
  return Packed{L, qc, v};
}

// Dense rows [r0, r1) of W in `dtype` (fp32/fp16/bf16), [r1 - r0, cols].
at::Tensor dequant_rows(const Packed& P, int64_t r0, int64_t r1, at::ScalarType dtype,
                        cudaStream_t stream, const char* op) {
  at::Tensor out = at::empty({r1 - r0, P.L.cols}, P.qcodes.options().dtype(dtype));
  check_launch(launch_dequantize(P.view, r0 * P.L.cols, r1 * P.L.cols, out.data_ptr(),
                                 to_dtype(dtype, op, "dtype"), stream),
               op);
  return out;
}

// ------------------------------------------------------------------------------ quantize
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_cuda(
    const at::Tensor& w, const at::Tensor& levels, int64_t bits, int64_t block_size,
    int64_t scale_bits, int64_t scale_block_size, at::ScalarType scale_dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                   "lqlora.quantize: weight must be a floating tensor, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2, "lqlora.quantize: weight must be 2-D, got ", w.dim(), "-D");
  const NFLayout L =
      make_layout(w.size(0), w.size(1), bits, block_size, scale_bits, scale_block_size);
  check_levels(levels, bits, w.device());
  TORCH_CHECK_VALUE(scale_dtype == at::kFloat || scale_dtype == at::kHalf ||
                        scale_dtype == at::kBFloat16,
                    "lqlora: scale_dtype must be float32, float16 or bfloat16, got ",
                    scale_dtype);
  c10::DeviceGuard guard(w.device());
  const at::Tensor wf = w.to(at::kFloat).contiguous();
  const auto opts = wf.options();
  at::Tensor s1 = at::empty({L.nblocks()}, opts);
  check_launch(launch_quantize_absmax(wf.data_ptr<float>(), L.rows * L.cols,
                                      static_cast<int>(L.block_size), s1.data_ptr<float>(),
                                      current_stream(w.device())),
               "quantize");
  // NaN/Inf: the block absmax propagates them, so one check of s1 (1/block_size of the
  // weight's bytes, one sync) before the other kernels; only a bad weight is read again, to
  // name its first bad index.
  if (!at::isfinite(s1).all().item<bool>()) {
    const at::Tensor bad = at::logical_not(at::isfinite(wf)).view(-1);
    const int64_t i = at::argmax(bad.to(at::kByte)).item<int64_t>();
    TORCH_CHECK_VALUE(false, "lqlora.quantize: weight contains NaN/Inf; first at [", i / L.cols,
                      ", ", i % L.cols, "] (value ", wf.view(-1)[i].item<float>(), ")");
  }
  at::Tensor qcodes = at::empty({L.code_words()}, opts.dtype(at::kInt));
  at::Tensor qscales = at::empty({L.scale_words()}, opts.dtype(at::kInt));
  at::Tensor scale2 = at::empty({L.ngroups()}, opts.dtype(scale_dtype));
  at::Tensor offset = at::empty({1}, opts);
  at::Tensor shat = at::empty({L.nblocks()}, opts);
  at::Tensor c = at::empty({L.ngroups()}, opts);
  const at::Tensor lv = levels.contiguous();
  check_launch(launch_quantize(wf.data_ptr<float>(), L.rows, L.cols, lv.data_ptr<float>(),
                               L.bits, static_cast<int>(L.block_size), L.scale_bits,
                               static_cast<int>(L.scale_block_size),
                               to_dtype(scale_dtype, "quantize", "scale_dtype"),
                               reinterpret_cast<uint32_t*>(qcodes.data_ptr<int32_t>()),
                               reinterpret_cast<uint32_t*>(qscales.data_ptr<int32_t>()),
                               scale2.data_ptr(), offset.data_ptr<float>(), s1.data_ptr<float>(),
                               c.data_ptr<float>(), shat.data_ptr<float>(),
                               current_stream(w.device())),
               "quantize");
  // A second-level scale beyond scale_dtype's range is stored as inf and would decode to
  // NaN scales: refuse it as the CPU kernel does (same message). One more sync, like the
  // NaN check above; quantization is an offline step.
  if (scale_dtype != at::kFloat && !at::isfinite(scale2).all().item<bool>())
    TORCH_CHECK_VALUE(false, "lqlora.quantize: a second-level scale overflows ", scale_dtype,
                      " (block absmax spread ", offset.item<float>(),
                      " .. beyond the dtype's range); use bfloat16 or float32 scales");
  return {qcodes, qscales, scale2, offset};
}

// ------------------------------------------------------------------------- unpack_scales
at::Tensor unpack_scales_cuda(const at::Tensor& qscales, const at::Tensor& scale2,
                              const at::Tensor& offset, int64_t nblocks, int64_t scale_bits,
                              int64_t scale_block_size) {
  check_scale_args(qscales, scale2, offset, nblocks, scale_bits, scale_block_size);
  const DType sdt = to_dtype(scale2.scalar_type(), "unpack_scales", "scale2");
  c10::DeviceGuard guard(qscales.device());
  const at::Tensor qs = qscales.contiguous(), s2 = scale2.contiguous(), off = offset.contiguous();
  at::Tensor out = at::empty({nblocks}, qs.options().dtype(at::kFloat));
  check_launch(launch_unpack_scales(reinterpret_cast<const uint32_t*>(qs.data_ptr<int32_t>()),
                                    s2.data_ptr(), sdt, off.data_ptr<float>(), nblocks,
                                    static_cast<int>(scale_bits),
                                    static_cast<int>(scale_block_size), out.data_ptr<float>(),
                                    current_stream(qs.device())),
               "unpack_scales");
  return out;
}

// ---------------------------------------------------------------------------- dequantize
at::Tensor dequantize_cuda(const at::Tensor& qcodes, const at::Tensor& qscales,
                           const at::Tensor& scale2, const at::Tensor& offset,
                           const at::Tensor& levels, int64_t rows, int64_t cols, int64_t bits,
                           int64_t block_size, int64_t scale_bits, int64_t scale_block_size,
                           at::ScalarType dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "lqlora.dequantize: dtype must be floating, got ",
                   dtype);
  c10::DeviceGuard guard(qcodes.device());
  const Packed P = make_packed(qcodes, qscales, scale2, offset, levels, rows, cols, bits,
                               block_size, scale_bits, scale_block_size, "dequantize");
  const bool native = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  at::Tensor out = dequant_rows(P, 0, rows, native ? dtype : at::kFloat,
                                current_stream(qcodes.device()), "dequantize");
  return native ? out : out.to(dtype);  // e.g. float64: exact widening of the fp32 result
}

// ------------------------------------------------------------------------------- qmatmul
at::Tensor qmatmul_cuda(const at::Tensor& x, const at::Tensor& qcodes, const at::Tensor& qscales,
                        const at::Tensor& scale2, const at::Tensor& offset,
                        const at::Tensor& levels, int64_t rows, int64_t bits, int64_t block_size,
                        int64_t scale_bits, int64_t scale_block_size,
                        const std::optional<at::Tensor>& lora_a,
                        const std::optional<at::Tensor>& lora_b, double lora_scale) {
  const NoAutocast no_autocast;
  check_activation(x, qcodes, "x", "qmatmul");
  TORCH_CHECK_VALUE(lora_a.has_value() == lora_b.has_value(),
                    "lqlora.qmatmul: lora_a and lora_b must be given together");
  c10::DeviceGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = rows;
  const Packed P = make_packed(qcodes, qscales, scale2, offset, levels, rows, K, bits,
                               block_size, scale_bits, scale_block_size, "qmatmul");
  at::Tensor a, b;
  if (lora_a.has_value()) {
    a = *lora_a;
    b = *lora_b;
    check_activation(a, qcodes, "lora_a", "qmatmul");
    check_activation(b, qcodes, "lora_b", "qmatmul");
    TORCH_CHECK_VALUE(a.size(1) == K && b.size(0) == N && b.size(1) == a.size(0),
                      "lqlora.qmatmul: LoRA shapes must be lora_a [r, ", K, "] and lora_b [", N,
                      ", r], got ", a.sizes(), " and ", b.sizes());
  }
  const cudaStream_t stream = current_stream(x.device());
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;

  if (M <= qmatmul_fused_max_m(to_dtype(x.scalar_type(), "qmatmul", "x"), K)) {
    const at::Tensor xc = aligned16(x.contiguous());
    at::Tensor t, ready;
    LoraView lv{};
    if (a.defined() && a.size(0) > 0) {
      a = a.contiguous();
      b = b.contiguous();
      t = at::empty({lora_t_floats(M, K, a.size(0))}, x.options().dtype(at::kFloat));
      ready = at::empty({lora_ready_ints(static_cast<int>(M), static_cast<int>(a.size(0)))},
                        x.options().dtype(at::kInt));
      lv = LoraView{a.data_ptr(), to_dtype(a.scalar_type(), "qmatmul", "lora_a"),
                    b.data_ptr(), to_dtype(b.scalar_type(), "qmatmul", "lora_b"),
                    static_cast<int>(a.size(0)), static_cast<float>(lora_scale),
                    t.data_ptr<float>(), ready.data_ptr<int>()};
    }
    check_launch(launch_qmatmul_small(xc.data_ptr(), to_dtype(x.scalar_type(), "qmatmul", "x"),
                                      static_cast<int>(M), P.view, t.defined() ? &lv : nullptr,
                                      out.data_ptr(), stream),
                 "qmatmul");
    return out;
  }

  // Large M: the decode is shared by M rows of x, so dequantize (in x's dtype, chunks of
  // rows) and let cuBLAS do the product through ATen.
  const at::ScalarType dt = x.scalar_type();
  const int64_t chunk = std::max<int64_t>(1, kChunkElems / K);
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t r1 = std::min(N, r0 + chunk);
    const at::Tensor w = dequant_rows(P, r0, r1, dt, stream, "qmatmul");
    // Straight into out's columns: a [M, rows] view with row stride N is a matrix cuBLAS
    // writes in place (ldc = N), so no temporary and no strided copy per chunk.
    at::Tensor cols = out.narrow(1, r0, r1 - r0);
    at::mm_out(cols, x, w.t());
  }
  if (a.defined() && a.size(0) > 0)
    out.addmm_(at::mm(x, a.to(dt).t()), b.to(dt).t(), 1.0, lora_scale);
  return out;
}

// ----------------------------------------------------------------------------- qmatmul_t
at::Tensor qmatmul_t_cuda(const at::Tensor& g, const at::Tensor& qcodes,
                          const at::Tensor& qscales, const at::Tensor& scale2,
                          const at::Tensor& offset, const at::Tensor& levels, int64_t cols,
                          int64_t bits, int64_t block_size, int64_t scale_bits,
                          int64_t scale_block_size) {
  const NoAutocast no_autocast;
  check_activation(g, qcodes, "g", "qmatmul_t");
  c10::DeviceGuard guard(g.device());
  const int64_t M = g.size(0), N = g.size(1), K = cols;
  const Packed P = make_packed(qcodes, qscales, scale2, offset, levels, N, K, bits, block_size,
                               scale_bits, scale_block_size, "qmatmul_t");
  const cudaStream_t stream = current_stream(g.device());
  if (M == 0) return at::zeros({M, K}, g.options());

  if (M <= kSmallM) {
    const at::Tensor gc = g.contiguous();
    at::Tensor scales = at::empty({P.L.nblocks()}, g.options().dtype(at::kFloat));
    check_launch(launch_unpack_scales(P.view.qscales, P.view.scale2, P.view.scale2_dtype,
                                      P.view.offset, P.L.nblocks(), P.view.scale_bits,
                                      P.view.scale_block_size, scales.data_ptr<float>(), stream),
                 "qmatmul_t");
    const int splits = qmatmul_t_splits(N, K, static_cast<int>(M));
    at::Tensor partial = at::empty({splits, M, K}, g.options().dtype(at::kFloat));
    at::Tensor out = at::empty({M, K}, g.options());
    check_launch(launch_qmatmul_t_small(gc.data_ptr(), to_dtype(g.scalar_type(), "qmatmul_t", "g"),
                                        static_cast<int>(M), P.view, scales.data_ptr<float>(),
                                        splits, partial.data_ptr<float>(), out.data_ptr(), stream),
                 "qmatmul_t");
    return out;
  }

  const at::ScalarType dt = g.scalar_type();
  const int64_t chunk = std::max<int64_t>(1, kChunkElems / K);
  if (chunk >= N) return at::mm(g, dequant_rows(P, 0, N, dt, stream, "qmatmul_t"));
  at::Tensor out = at::zeros({M, K}, g.options().dtype(at::kFloat));  // fp32 across chunks
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t r1 = std::min(N, r0 + chunk);
    out.add_(at::mm(g.narrow(1, r0, r1 - r0), dequant_rows(P, r0, r1, dt, stream, "qmatmul_t")));
  }
  return out.to(dt);
}

}  // namespace

TORCH_LIBRARY_IMPL(LQ_OPS_NAMESPACE, LQ_OPS_DISPATCH, m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("unpack_scales", &unpack_scales_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("qmatmul", &qmatmul_cuda);
  m.impl("qmatmul_t", &qmatmul_t_cuda);
}

}  // namespace lqlora::cuda
