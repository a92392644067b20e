// RAII guards shared by kernels that call ATen internally. Host-only.
#pragma once
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace lqlora {

// Our ops have their own numerics (fp32 accumulation, results in x's dtype). Inside a
// kernel, an enclosing torch.autocast would otherwise recast the ATen GEMMs we call
// (at::mm -> bf16) and break the in-place accumulations that follow. The Python wrapper
// applies autocast's casts to the op's inputs, as F.linear does; the kernel runs as given.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace lqlora
