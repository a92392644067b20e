// Which device the CUDA glue (ops_cuda.cpp) serves. The same glue is compiled twice:
//   - into lqlora_ext._C with nvcc-built kernels: lqlora::* on CUDA tensors, torch's current
//     CUDA stream;
//   - into lqlora_ext._emu (LQLORA_EMU) with the same kernels built for the SIMT emulator:
//     lqlora_emu::* on CPU tensors (host memory stands in for device memory), no stream.
// Everything else in the glue (path choice, chunking, checks, LoRA handling) is shared, so
// the emulated suite exercises it too. This header is the glue's only backend switch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cuda_runtime_api.h>

#if defined(LQLORA_EMU)
#define LQ_OPS_NAMESPACE lqlora_emu
#define LQ_OPS_DISPATCH CPU
#else
#define LQ_OPS_NAMESPACE lqlora
#define LQ_OPS_DISPATCH CUDA
#endif

namespace lqlora::cuda {

#if defined(LQLORA_EMU)
constexpr const char* kBackendDevice = "CPU (the SIMT emulator runs on host memory)";
inline bool on_backend(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t current_stream(const at::Device&) { return nullptr; }
#else
constexpr const char* kBackendDevice = "CUDA";
inline bool on_backend(const at::Tensor& t) { return t.is_cuda(); }
// torch's current CUDA stream on `device`, as the cudaStream_t. This is what
// c10::Stream::native_handle() does (torch >= 2.11, pytorch#171040), called through the
// DeviceGuardImplInterface vtable directly: same result, but no link-time dependency on the
// libc10 symbol, so a torch without it fails at build time, not at import.
inline cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::DeviceGuardImplInterface* impl =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStreamNativeHandle(impl->getStream(device)));
}
#endif

// A launcher's error (launch.h, rsvd.h) raised as lqlora.<op>'s RuntimeError.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "lqlora.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

}  // namespace lqlora::cuda
