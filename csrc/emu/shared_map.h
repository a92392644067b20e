// Per-kernel __shared__ storage in the emulator module's TLS block (shared_map.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace lqlora::emu {

struct SharedRange {
  uint64_t offset;  // from the start of the module's TLS block
  uint64_t size;
};

// The __shared__ arrays declared in the body of the kernel function at `kernel`, or nullptr
// when the module's symbol table is unavailable (stripped) or `kernel` is not in it.
const std::vector<SharedRange>* kernel_shared_ranges(const void* kernel);

}  // namespace lqlora::emu
