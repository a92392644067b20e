// Where a kernel's __shared__ arrays live in this module's TLS block, so that each block
// start poisons just those (tens of bytes to a few KiB) instead of the whole block (every
// kernel's shared arrays together, ~1 MiB): at 10^4-10^5 blocks per test case the full
// poison dominated the emulator's run time.
//
// A `static thread_local` declared in function F is the symbol "_ZZ" + F's mangled name
// without "_Z" + "E" + the variable, and a TLS symbol's st_value is its offset in the TLS
// segment; both are in the module's own .symtab, read once from the file on disk. Arrays
// declared in __device__ helpers are not attributed to a kernel: the scheduler poisons the
// whole TLS block once per launch and worker, which covers them at launch granularity.
#include "shared_map.h"

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>

namespace lqlora::emu {
namespace {

struct SymbolTable {
  bool ok = false;
  uintptr_t base = 0;                              // load address of the module
  std::unordered_map<uint64_t, std::string> funcs; // st_value -> mangled name
  std::map<std::string, SharedRange> statics;      // mangled TLS name -> range
};

SymbolTable load_table(const void* any_function) {
  SymbolTable t;
  Dl_info info;
  if (dladdr(any_function, &info) == 0 || info.dli_fname == nullptr) return t;
  t.base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  const int fd = open(info.dli_fname, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return t;
  // The size by lseek, not fstat: glibc >= 2.33 binds fstat to fstat@GLIBC_2.33, which
  // would lift the wheel above torch's manylinux_2_28 floor (lseek is GLIBC_2.2.5).
  const off_t size = lseek(fd, 0, SEEK_END);
  if (size < static_cast<off_t>(sizeof(Elf64_Ehdr))) {
    close(fd);
    return t;
  }
  const size_t len = static_cast<size_t>(size);
  void* map = mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return t;
  const char* img = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(img);
  const bool elf64 = std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 &&
                     eh->e_ident[EI_CLASS] == ELFCLASS64 && eh->e_shoff > 0 &&
                     eh->e_shoff + uint64_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= len;
  if (elf64) {
    if (eh->e_type == ET_EXEC) t.base = 0;  // a non-PIE executable: st_value is absolute
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(img + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
      const Elf64_Shdr& strs = sh[sh[i].sh_link];
      if (sh[i].sh_offset + sh[i].sh_size > len || strs.sh_offset + strs.sh_size > len) break;
      const auto* sym = reinterpret_cast<const Elf64_Sym*>(img + sh[i].sh_offset);
      const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
      for (size_t k = 0; k < n; ++k) {
        if (sym[k].st_name >= strs.sh_size) continue;
        const char* name = img + strs.sh_offset + sym[k].st_name;
        const int type = ELF64_ST_TYPE(sym[k].st_info);
        if (type == STT_FUNC && sym[k].st_value != 0 && std::strncmp(name, "_Z", 2) == 0)
          t.funcs.emplace(sym[k].st_value, name);
        else if (type == STT_TLS && std::strncmp(name, "_ZZ", 3) == 0)
          t.statics.emplace(name, SharedRange{sym[k].st_value, sym[k].st_size});
      }
      t.ok = true;
    }
  }
  munmap(map, len);
  return t;
}

std::mutex g_mu;
SymbolTable* g_table = nullptr;
std::unordered_map<const void*, std::vector<SharedRange>> g_cache;

}  // namespace

const std::vector<SharedRange>* kernel_shared_ranges(const void* kernel) {
  std::lock_guard<std::mutex> g(g_mu);
  if (g_table == nullptr) g_table = new SymbolTable(load_table(kernel));
  if (!g_table->ok) return nullptr;
  auto hit = g_cache.find(kernel);
  if (hit != g_cache.end()) return &hit->second;
  const auto f = g_table->funcs.find(reinterpret_cast<uintptr_t>(kernel) - g_table->base);
  if (f == g_table->funcs.end()) return nullptr;  // not a symbol of this module: no map
  std::vector<SharedRange> ranges;
  const std::string prefix = "_ZZ" + f->second.substr(2) + "E";
  for (auto it = g_table->statics.lower_bound(prefix);
       it != g_table->statics.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it)
    ranges.push_back(it->second);
  return &g_cache.emplace(kernel, std::move(ranges)).first->second;
}

}  // namespace lqlora::emu
