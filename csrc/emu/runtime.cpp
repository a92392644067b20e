// The SIMT emulator's scheduler (runtime.h): fibers, barriers, warp collectives, fault
// reports, the per-block shared-memory poison, and the few CUDA runtime API calls the
// kernels' launchers make. Host-only, torch-free.
//
// State that must survive a block start lives on the heap or the scheduler's stack, never in
// this module's thread-local storage: run_block poisons that whole TLS block (it holds the
// kernels' `static thread_local` __shared__ arrays) and then re-sets the built-in variables
// and `tl_worker` before every resume.
#include "runtime.h"

#include "shared_map.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define LQ_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LQ_EMU_ASAN 1
#endif
#endif
#if defined(LQ_EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

#define LQ_EMU_EXPORT extern "C" __attribute__((visibility("default")))

#if defined(__x86_64__)
extern "C" void lqlora_emu_switch(void** save_sp, void* load_sp);
extern "C" void lqlora_emu_fiber_entry();
#endif

namespace lqlora::emu {
namespace {

// ------------------------------------------------------------------------------ config
enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
  std::atomic<int> order{0};
  std::atomic<uint64_t> seed{0};
  std::atomic<int> workers{1};
  std::atomic<int> sms{132};  // what cudaDevAttrMultiProcessorCount reports (H100/H200)
  size_t stack_bytes = 0;
};

Config& config() {
  static Config* c = [] {
    auto* cfg = new Config;
    if (const char* s = std::getenv("LQLORA_EMU_SCHEDULE")) {
      const std::string v(s);
      cfg->order = v == "reverse" ? 1 : (v == "random" ? 2 : 0);
    }
    if (const char* s = std::getenv("LQLORA_EMU_SEED")) cfg->seed = std::strtoull(s, nullptr, 10);
    if (const char* s = std::getenv("LQLORA_EMU_WORKERS"))
      cfg->workers = std::max(1, std::atoi(s));
    if (const char* s = std::getenv("LQLORA_EMU_SMS")) cfg->sms = std::max(1, std::atoi(s));
#if defined(LQ_EMU_ASAN)
    cfg->stack_bytes = size_t(512) << 10;  // ASan's redzones make frames much larger
#else
    cfg->stack_bytes = size_t(128) << 10;
#endif
    if (const char* s = std::getenv("LQLORA_EMU_STACK_KB"))
      cfg->stack_bytes = std::max<size_t>(16, std::strtoull(s, nullptr, 10)) << 10;
    return cfg;
  }();
  return *c;
}

struct Stats {
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, switches{0};
};
Stats g_stats;

// ------------------------------------------------------------- host-thread CUDA state
// The last error of each host thread (cudaGetLastError), kept behind a pthread key: this
// module's TLS is poisoned at every block start.
struct HostState {
  cudaError_t pending = cudaSuccess;  // returned (and cleared) by cudaGetLastError
  std::string message;                // the report of the last fault (cudaGetErrorString)
};

pthread_key_t host_key() {
  static pthread_key_t key = [] {
    pthread_key_t k;
    pthread_key_create(&k, [](void* p) { delete static_cast<HostState*>(p); });
    return k;
  }();
  return key;
}

HostState& host_state() {
  auto* s = static_cast<HostState*>(pthread_getspecific(host_key()));
  if (s == nullptr) {
    s = new HostState;
    pthread_setspecific(host_key(), s);
  }
  return *s;
}

// ------------------------------------------------------------------------------ stacks
struct Stack {
  char* base = nullptr;  // mapping start (guard page first)
  size_t size = 0;       // usable bytes above the guard page
  char* bottom() const { return base + page(); }
  char* top() const { return base + page() + size; }
  static size_t page() {
    static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    return p;
  }
};

std::mutex g_stack_mu;
std::vector<Stack> g_stack_cache;

Stack take_stack() {
  const size_t size = config().stack_bytes;
  {
    std::lock_guard<std::mutex> g(g_stack_mu);
    while (!g_stack_cache.empty()) {
      Stack s = g_stack_cache.back();
      g_stack_cache.pop_back();
      if (s.size == size) return s;
      munmap(s.base, s.size + Stack::page());
    }
  }
  void* p = mmap(nullptr, size + Stack::page(), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "lqlora SIMT emulator: cannot map a %zu-byte fiber stack\n", size);
    std::abort();
  }
  mprotect(p, Stack::page(), PROT_NONE);  // guard page: an overflow faults, never corrupts
  return Stack{static_cast<char*>(p), size};
}

void give_stacks(std::vector<Stack>& stacks) {
  std::lock_guard<std::mutex> g(g_stack_mu);
  for (const Stack& s : stacks) g_stack_cache.push_back(s);
  stacks.clear();
}

// ----------------------------------------------------------------------- threads, warps
enum class State : uint8_t { kReady, kRunning, kBarrier, kWarp, kExited };

struct Worker;

struct Thread {
  Worker* worker = nullptr;
  int linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  uint3 tid{};
  State state = State::kReady;
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  // What the thread waits for (kBarrier / kWarp), and the value it gets back.
  std::source_location site;
  Barrier bar = Barrier::kSync;
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t value = 0, result = 0;
  bool started = false;
  uint64_t spins = 0;  // __nanosleep calls (spin_wait)
  // warp_compute
  WarpComputeFn fn = nullptr;
  const char* fn_name = nullptr;
  const void* in = nullptr;
  void* out = nullptr;
  // cp.async: closed groups (oldest first) and the open one
  struct Copy { void* dst; const void* src; size_t bytes; };
  std::vector<std::vector<Copy>> async_groups;
  std::vector<Copy> async_open;
#if defined(LQ_EMU_ASAN)
  void* fake_stack = nullptr;
#endif
};

struct Warp {
  unsigned present = 0;  // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;
  unsigned waiting = 0;  // lanes blocked in a collective
};

// One OS thread executing blocks; everything about the running block.
struct Worker {
  const LaunchInfo* info = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  uint3 bid{};
  int nthreads = 0;
  std::vector<Thread> threads;
  std::vector<Stack> stacks;
  std::vector<Warp> warps;
  std::vector<int> order;
  int bar_arrived = 0, exited = 0;
  Thread* cur = nullptr;
#if defined(__x86_64__)
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
#if defined(LQ_EMU_ASAN)
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
  bool faulted = false;
  bool aborting = false;  // unwinding the blocked threads after a fault
  std::string fault;
  char* tls = nullptr;  // this OS thread's instance of the module's TLS block
  size_t tls_size = 0;
  const std::vector<SharedRange>* shared = nullptr;  // the kernel's __shared__ arrays
};

// The worker whose fiber is running (re-set before every resume; see the header comment).
inline thread_local Worker* tl_worker = nullptr;

std::string lanes_str(uint64_t bits, int base = 0) {
  std::string s;
  for (int i = 0; i < 64; ++i) {
    if (!((bits >> i) & 1)) continue;
    int j = i;
    while (j + 1 < 64 && ((bits >> (j + 1)) & 1)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(base + i);
    if (j > i) s += "-" + std::to_string(base + j);
    i = j;
  }
  return s.empty() ? "none" : s;
}

std::string hex(unsigned v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

std::string ids_str(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j;
  }
  return s;
}

std::string site_str(const std::source_location& l) {
  const char* f = l.file_name();
  const char* slash = std::strrchr(f, '/');
  return std::string(slash ? slash + 1 : f) + ":" + std::to_string(l.line());
}

bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && a.column() == b.column() &&
         (a.file_name() == b.file_name() || std::strcmp(a.file_name(), b.file_name()) == 0);
}

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kReduceAdd: return "__reduce_add_sync";
    case WarpOp::kReduceMin: return "__reduce_min_sync";
    case WarpOp::kReduceMax: return "__reduce_max_sync";
    case WarpOp::kReduceAnd: return "__reduce_and_sync";
    case WarpOp::kReduceOr: return "__reduce_or_sync";
    case WarpOp::kReduceXor: return "__reduce_xor_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    case WarpOp::kCompute: return "warp instruction";
  }
  return "warp collective";
}

const char* bar_name(Barrier b) {
  switch (b) {
    case Barrier::kSync: return "__syncthreads";
    case Barrier::kCount: return "__syncthreads_count";
    case Barrier::kAnd: return "__syncthreads_and";
    case Barrier::kOr: return "__syncthreads_or";
  }
  return "__syncthreads";
}

std::string where(const Worker& w) {
  const LaunchInfo& i = *w.info;
  char buf[256];
  std::snprintf(buf, sizeof buf, " in block (%u,%u,%u) of grid (%u,%u,%u), block (%u,%u,%u)",
                w.bid.x, w.bid.y, w.bid.z, i.grid.x, i.grid.y, i.grid.z, i.block.x, i.block.y,
                i.block.z);
  const char* slash = std::strrchr(i.file, '/');
  return std::string("SIMT emulator: kernel ") + i.kernel + " (launched at " +
         (slash ? slash + 1 : i.file) + ":" + std::to_string(i.line) + ")" + buf + ": ";
}

// -------------------------------------------------------------------------- switching
void to_scheduler(Worker& w, Thread& t, bool final) {
  g_stats.switches.fetch_add(1, std::memory_order_relaxed);
#if defined(LQ_EMU_ASAN)
  __sanitizer_start_switch_fiber(final ? nullptr : &t.fake_stack, w.sched_bottom, w.sched_size);
#else
  (void)final;
#endif
#if defined(__x86_64__)
  lqlora_emu_switch(&t.sp, w.sched_sp);
#else
  swapcontext(&t.uc, &w.sched_uc);
#endif
#if defined(LQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(t.fake_stack, &w.sched_bottom, &w.sched_size);
#endif
}

// Thrown inside a fiber to abandon its CUDA thread: unwinding stays on the fiber's own stack
// (fiber_main catches it), so the kernel's locals are destroyed and nothing leaks.
struct FiberAbort {};

[[noreturn]] void fault_here(Worker& w, const std::string& what) {
  if (!w.faulted) {
    w.faulted = true;
    w.fault = where(w) + what;
  }
  throw FiberAbort{};
}

// Back from the scheduler inside a blocking call: a fault elsewhere abandons this thread.
void resumed(Worker& w) {
  if (w.aborting) throw FiberAbort{};
}

void flush_async(Thread& t, size_t keep) {
  // Oldest first, as the hardware completes groups in commit order.
  while (t.async_groups.size() > keep) {
    for (const Thread::Copy& c : t.async_groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    t.async_groups.erase(t.async_groups.begin());
  }
}

void exit_checks(Worker& w, Thread& t) {
  // Outstanding cp.async copies still land (a thread may exit without waiting).
  if (!t.async_open.empty()) {
    t.async_groups.push_back(std::move(t.async_open));
    t.async_open.clear();
  }
  flush_async(t, 0);
  Warp& wp = w.warps[t.linear >> 5];
  const unsigned bit = 1u << (t.linear & 31);
  if (w.bar_arrived > 0) {
    const Thread* waiter = nullptr;
    for (const Thread& o : w.threads)
      if (o.state == State::kBarrier) waiter = &o;
    fault_here(w, "thread " + std::to_string(t.linear) + " exited while other threads wait at " +
                      bar_name(waiter->bar) + " (" + site_str(waiter->site) +
                      "): a barrier every thread of the block does not reach");
  }
  for (unsigned left = wp.waiting; left != 0; left &= left - 1) {
    const int l = __builtin_ctz(left);
    const Thread& o = w.threads[(t.linear & ~31) + l];
    if (o.mask & bit)
      fault_here(w, std::string(o.op == WarpOp::kCompute ? o.fn_name : op_name(o.op)) + " at " +
                        site_str(o.site) + " with mask " +
                        hex(o.mask) + " names lane " + std::to_string(t.linear & 31) +
                        " of warp " + std::to_string(t.linear >> 5) + ", which exited");
  }
  wp.exited |= bit;
  ++w.exited;
}

void fiber_main(Thread* t) {
  Worker& w = *t->worker;
#if defined(LQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_bottom, &w.sched_size);
#endif
  t->started = true;
  try {
    resumed(w);
    w.body(w.ctx);
    exit_checks(w, *t);
  } catch (const FiberAbort&) {
  }
  t->state = State::kExited;
  to_scheduler(w, *t, true);
  __builtin_unreachable();
}

#if defined(__x86_64__)
void init_stack(Thread& t, const Stack& s) {
  // The frame lqlora_emu_switch pops (switch_x86_64.S): after its `ret` into
  // lqlora_emu_fiber_entry, rsp = top (16-byte aligned), as a call site needs.
  auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(s.top()) & ~uintptr_t(15));
  uint64_t* f = top - 8;
  const uint32_t mxcsr = 0x1f80;  // round to nearest, all exceptions masked, no FTZ/DAZ
  const uint16_t fpucw = 0x037f;
  std::memcpy(reinterpret_cast<char*>(f), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(f) + 4, &fpucw, 2);
  f[1] = 0;                                                 // r15
  f[2] = 0;                                                 // r14
  f[3] = reinterpret_cast<uint64_t>(&fiber_main);           // r13: function
  f[4] = reinterpret_cast<uint64_t>(&t);                    // r12: argument
  f[5] = 0;                                                 // rbx
  f[6] = 0;                                                 // rbp
  f[7] = reinterpret_cast<uint64_t>(&lqlora_emu_fiber_entry);  // return address
  t.sp = f;
}
#else
void fiber_main_uc(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Thread*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
void init_stack(Thread& t, const Stack& s) {
  getcontext(&t.uc);
  t.uc.uc_stack.ss_sp = s.bottom();
  t.uc.uc_stack.ss_size = s.size;
  t.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&t);
  makecontext(&t.uc, reinterpret_cast<void (*)()>(&fiber_main_uc), 2,
              static_cast<unsigned>(p >> 32), static_cast<unsigned>(p));
}
#endif

void resume(Worker& w, Thread& t) {
  threadIdx = t.tid;
  blockIdx = w.bid;
  blockDim = w.info->block;
  gridDim = w.info->grid;
  tl_worker = &w;
  w.cur = &t;
  t.state = State::kRunning;
  g_stats.switches.fetch_add(1, std::memory_order_relaxed);
  const Stack& s = w.stacks[t.linear];
#if defined(LQ_EMU_ASAN)
  __sanitizer_start_switch_fiber(&w.sched_fake, s.bottom(), s.size);
#else
  (void)s;
#endif
#if defined(__x86_64__)
  lqlora_emu_switch(&w.sched_sp, t.sp);
#else
  swapcontext(&w.sched_uc, &t.uc);
#endif
#if defined(LQ_EMU_ASAN)
  __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
}

// ------------------------------------------------------------------ the TLS block poison
// This module's TLS block in the calling thread: the kernels' __shared__ arrays live there.
int find_tls(struct dl_phdr_info* info, size_t, void* data) {
  auto* w = static_cast<Worker*>(data);
  const uintptr_t self = reinterpret_cast<uintptr_t>(&find_tls);
  bool mine = false;  // does one of this object's loaded segments hold this function?
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    mine |= ph.p_type == PT_LOAD && self >= lo && self < lo + ph.p_memsz;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      w->tls = static_cast<char*>(info->dlpi_tls_data);
      w->tls_size = info->dlpi_phdr[i].p_memsz;
    }
  return 1;
}

void locate_tls(Worker& w) {
  threadIdx = uint3{0, 0, 0};  // touch: makes the loader allocate this thread's block
  dl_iterate_phdr(&find_tls, &w);
}

// ------------------------------------------------------------------------- collectives
bool is_pow2(int v) { return v > 0 && (v & (v - 1)) == 0; }

// Computes the results of a complete collective (every lane of `mask` waiting at it).
void complete_warp_op(Worker& w, Thread& me, int warp, unsigned mask) {
  Thread* lanes = &w.threads[warp * 32];
  if (me.op == WarpOp::kCompute) {
    const void* ins[32];
    void* outs[32];
    for (int l = 0; l < 32; ++l) {
      const bool in_mask = (mask >> l) & 1;
      ins[l] = in_mask ? lanes[l].in : nullptr;
      outs[l] = in_mask ? lanes[l].out : nullptr;
    }
    me.fn(ins, outs);
    for (int l = 0; l < 32; ++l)
      if ((mask >> l) & 1) lanes[l].state = State::kReady;
    w.warps[warp].waiting &= ~mask;
    me.state = State::kRunning;
    return;
  }
  const Thread& ref = me;
  uint64_t agg = 0;
  bool signed_op = ref.arg != 0;
  switch (ref.op) {
    case WarpOp::kBallot:
    case WarpOp::kAny:
    case WarpOp::kAll: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (((mask >> l) & 1) && lanes[l].value) ballot |= 1u << l;
      agg = ref.op == WarpOp::kBallot ? ballot
                                      : (ref.op == WarpOp::kAny ? ballot != 0 : ballot == mask);
      break;
    }
    case WarpOp::kReduceAdd: case WarpOp::kReduceMin: case WarpOp::kReduceMax:
    case WarpOp::kReduceAnd: case WarpOp::kReduceOr: case WarpOp::kReduceXor: {
      bool first = true;
      uint32_t acc = 0;
      for (int l = 0; l < 32; ++l) {
        if (!((mask >> l) & 1)) continue;
        const uint32_t v = static_cast<uint32_t>(lanes[l].value);
        if (first) { acc = v; first = false; continue; }
        switch (ref.op) {
          case WarpOp::kReduceAdd: acc += v; break;
          case WarpOp::kReduceMin:
            acc = signed_op ? static_cast<uint32_t>(std::min<int32_t>(acc, v)) : std::min(acc, v);
            break;
          case WarpOp::kReduceMax:
            acc = signed_op ? static_cast<uint32_t>(std::max<int32_t>(acc, v)) : std::max(acc, v);
            break;
          case WarpOp::kReduceAnd: acc &= v; break;
          case WarpOp::kReduceOr: acc |= v; break;
          default: acc ^= v; break;
        }
      }
      agg = acc;
      break;
    }
    default: break;
  }
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1)) continue;
    Thread& t = lanes[l];
    const int seg = l & ~(t.width - 1), in_seg = l & (t.width - 1);
    int src = l;
    switch (t.op) {
      case WarpOp::kShflIdx: src = seg + (t.arg & (t.width - 1)); break;
      case WarpOp::kShflUp: src = in_seg >= t.arg ? l - t.arg : l; break;
      case WarpOp::kShflDown: src = in_seg + t.arg < t.width ? l + t.arg : l; break;
      case WarpOp::kShflXor: {
        const int x = l ^ (t.arg & 31);
        src = x < seg + t.width ? x : l;  // later segments are out of reach: own value
        break;
      }
      default: break;
    }
    switch (t.op) {
      case WarpOp::kShflIdx: case WarpOp::kShflUp: case WarpOp::kShflDown:
      case WarpOp::kShflXor:
        if (!((mask >> src) & 1))
          fault_here(w, std::string(op_name(t.op)) + " at " + site_str(t.site) + ": lane " +
                                std::to_string(l) + " of warp " + std::to_string(warp) +
                                " reads lane " + std::to_string(src) +
                                ", which is not in the mask " + hex(mask) +
                                " (its value is undefined)");
        t.result = lanes[src].value;
        break;
      case WarpOp::kMatchAny: {
        unsigned m = 0;
        for (int k = 0; k < 32; ++k)
          if (((mask >> k) & 1) && lanes[k].value == t.value) m |= 1u << k;
        t.result = m;
        break;
      }
      case WarpOp::kSync: t.result = 0; break;
      default: t.result = agg; break;
    }
  }
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1) lanes[l].state = State::kReady;
  w.warps[warp].waiting &= ~mask;
  me.state = State::kRunning;
}

// Every lane of `mask` waits at a collective identical to the caller's?
bool agrees(const Worker& w, const Thread& me, int warp, unsigned mask) {
  const Thread* lanes = &w.threads[warp * 32];
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1)) continue;
    const Thread& t = lanes[l];
    if (t.op != me.op || t.mask != me.mask || t.width != me.width || t.fn != me.fn ||
        !same_site(t.site, me.site))
      return false;
    if (me.op >= WarpOp::kReduceAdd && me.op <= WarpOp::kReduceXor && t.arg != me.arg)
      return false;  // signed vs unsigned reduction
  }
  return true;
}

// ------------------------------------------------------------------------- diagnosis
std::string describe_waits(const Worker& w) {
  // Group blocked threads by what they wait at.
  struct Group { std::string what; std::vector<int> ids; };
  std::vector<Group> groups;
  for (const Thread& t : w.threads) {
    std::string what;
    if (t.state == State::kBarrier) {
      what = std::string(bar_name(t.bar)) + " at " + site_str(t.site);
    } else if (t.state == State::kWarp) {
      what = std::string(t.op == WarpOp::kCompute ? t.fn_name : op_name(t.op)) + " at " + site_str(t.site) + " (warp " +
             std::to_string(t.linear >> 5) + ", mask " + hex(t.mask) + ")";
    } else {
      continue;
    }
    auto it = std::find_if(groups.begin(), groups.end(),
                           [&](const Group& g) { return g.what == what; });
    if (it == groups.end()) groups.push_back({what, {t.linear}});
    else it->ids.push_back(t.linear);
  }
  std::string s;
  for (const Group& g : groups) s += "; threads " + ids_str(g.ids) + " wait at " + g.what;
  if (w.exited > 0) {
    std::vector<int> ex;
    for (const Thread& t : w.threads)
      if (t.state == State::kExited) ex.push_back(t.linear);
    s += "; threads " + ids_str(ex) + " have exited";
  }
  return s;
}

std::string diagnose_stuck(const Worker& w) {
  // A warp whose waiting lanes cover each other's masks but wait at different collectives:
  // divergent collectives (e.g. a full-mask shuffle inside a divergent branch).
  for (size_t k = 0; k < w.warps.size(); ++k) {
    const Warp& wp = w.warps[k];
    for (int l = 0; l < 32; ++l) {
      if (!((wp.waiting >> l) & 1)) continue;
      const Thread& t = w.threads[k * 32 + l];
      if ((wp.waiting & t.mask) == t.mask && !agrees(w, t, static_cast<int>(k), t.mask))
        return "divergent warp collectives: the lanes of one mask wait at different "
               "collectives, masks or widths" + describe_waits(w);
    }
  }
  bool barrier = false, warp = false;
  for (const Thread& t : w.threads) {
    barrier |= t.state == State::kBarrier;
    warp |= t.state == State::kWarp;
  }
  if (barrier && !warp) {
    std::string first;
    for (const Thread& t : w.threads)
      if (t.state == State::kBarrier) {
        if (first.empty()) first = site_str(t.site);
        else if (site_str(t.site) != first)
          return "divergent barriers: threads wait at different __syncthreads" +
                 describe_waits(w);
      }
  }
  return "deadlock: no thread can run" + describe_waits(w);
}

// ---------------------------------------------------------------------------- blocks
// After a fault: resume every started, unfinished thread once so that it unwinds (FiberAbort
// from its blocking call) and its stack holds nothing live.
void abandon(Worker& w) {
  w.aborting = true;
  for (Thread& t : w.threads)
    if (t.started && t.state != State::kExited) resume(w, t);
  w.aborting = false;
}

void run_block(Worker& w, uint3 bid, int64_t block_linear) {
  w.bid = bid;
  // Poison __shared__: the kernel's own arrays (the whole TLS block once per launch, in
  // prepare_worker, covers arrays declared in helpers and an unknown layout).
  if (w.tls != nullptr && w.shared == nullptr) std::memset(w.tls, 0xff, w.tls_size);
  if (w.tls != nullptr && w.shared != nullptr)
    for (const SharedRange& r : *w.shared)
      if (r.offset + r.size <= w.tls_size) std::memset(w.tls + r.offset, 0xff, r.size);
  const int n = w.nthreads;
  w.bar_arrived = 0;
  w.exited = 0;
  for (int k = 0; k < static_cast<int>(w.warps.size()); ++k) {
    const int lanes = std::min(32, n - 32 * k);
    w.warps[k] = Warp{lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u), 0u, 0u};
  }
  const dim3 b = w.info->block;
  for (int i = 0; i < n; ++i) {
    Thread& t = w.threads[i];
    t.worker = &w;
    t.linear = i;
    t.tid = uint3{static_cast<unsigned>(i % b.x), static_cast<unsigned>((i / b.x) % b.y),
                  static_cast<unsigned>(i / (b.x * b.y))};
    t.state = State::kReady;
    t.started = false;
    t.mask = 0;
    t.async_groups.clear();
    t.async_open.clear();
    t.spins = 0;
    init_stack(t, w.stacks[i]);
  }
  const int order = config().order.load();
  std::mt19937_64 rng(config().seed.load() * 0x9e3779b97f4a7c15ull +
                      static_cast<uint64_t>(block_linear));
  for (int i = 0; i < n; ++i) w.order[i] = order == 1 ? n - 1 - i : i;
  while (true) {
    if (order == 2) std::shuffle(w.order.begin(), w.order.end(), rng);
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      Thread& t = w.threads[w.order[k]];
      if (t.state != State::kReady) continue;
      resume(w, t);
      ran = true;
      if (w.faulted) return abandon(w);
    }
    if (w.exited == n) return;
    if (!ran) {
      w.faulted = true;
      w.fault = where(w) + diagnose_stuck(w);
      return abandon(w);
    }
  }
}

void prepare_worker(Worker& w, const LaunchInfo& info, void (*body)(void*), void* ctx) {
  w.info = &info;
  w.body = body;
  w.ctx = ctx;
  w.nthreads = static_cast<int>(info.block.x * info.block.y * info.block.z);
  w.threads.assign(w.nthreads, Thread{});
  w.warps.assign((w.nthreads + 31) / 32, Warp{});
  w.order.assign(w.nthreads, 0);
  while (static_cast<int>(w.stacks.size()) < w.nthreads) w.stacks.push_back(take_stack());
  locate_tls(w);
  if (w.tls != nullptr) std::memset(w.tls, 0xff, w.tls_size);
  w.shared = kernel_shared_ranges(info.fn);
}

std::string check_config(const LaunchInfo& i) {
  const dim3 g = i.grid, b = i.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || threads == 0) return "empty grid or block";
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024)
    return "block of " + std::to_string(threads) + " threads (" + std::to_string(b.x) + "," +
           std::to_string(b.y) + "," + std::to_string(b.z) +
           ") exceeds 1024 threads or the per-dimension limits 1024 x 1024 x 64";
  if (g.x > 0x7fffffffu || g.y > 65535 || g.z > 65535) return "grid exceeds 2^31-1 x 65535 x 65535";
  if (i.smem != 0) return "dynamic shared memory is not supported by the emulator";
  return {};
}

}  // namespace

// ======================================================================= kernel-facing API
int block_barrier(Barrier kind, int pred, std::source_location loc) {
  Worker& w = *tl_worker;
  Thread& me = *w.cur;
  if (w.exited > 0) {
    std::vector<int> ex;
    for (const Thread& t : w.threads)
      if (t.state == State::kExited) ex.push_back(t.linear);
    fault_here(w, std::string(bar_name(kind)) + " at " + site_str(loc) +
                      " reached after threads " + ids_str(ex) +
                      " of the block exited: a barrier every thread does not reach");
  }
  me.site = loc;
  me.bar = kind;
  me.value = pred != 0;
  me.state = State::kBarrier;
  if (++w.bar_arrived == w.nthreads) {
    int count = 0;
    for (const Thread& t : w.threads) {
      if (!same_site(t.site, loc) || t.bar != kind)
        fault_here(w, "divergent barriers: threads wait at different barriers" +
                          describe_waits(w));
      count += static_cast<int>(t.value);
    }
    const int r = kind == Barrier::kCount ? count
                  : kind == Barrier::kAnd ? count == w.nthreads
                  : kind == Barrier::kOr  ? count > 0
                                          : 0;
    for (Thread& t : w.threads) {
      t.state = State::kReady;
      t.result = static_cast<uint64_t>(r);
    }
    w.bar_arrived = 0;
    me.state = State::kRunning;
    return r;
  }
  to_scheduler(w, me, false);
  resumed(w);
  return static_cast<int>(me.result);
}

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         std::source_location loc) {
  Worker& w = *tl_worker;
  Thread& me = *w.cur;
  const int warp = me.linear >> 5, lane = me.linear & 31;
  Warp& wp = w.warps[warp];
  if (((mask >> lane) & 1) == 0 || !is_pow2(width) || width > 32 || (mask & ~wp.present) ||
      (mask & wp.exited)) {
    const std::string what = std::string(op_name(op)) + " at " + site_str(loc) + " (lane " +
                             std::to_string(lane) + " of warp " + std::to_string(warp) +
                             ", mask " + hex(mask) + ")";
    if (!((mask >> lane) & 1)) fault_here(w, what + ": the mask does not include the calling lane");
    if (!is_pow2(width) || width > 32)
      fault_here(w, what + ": width " + std::to_string(width) +
                        " is not a power of two in 1..32");
    if (mask & ~wp.present)
      fault_here(w, what + ": the mask names lanes " + lanes_str(mask & ~wp.present) +
                        ", which do not exist (the block has " + std::to_string(w.nthreads) +
                        " threads)");
    fault_here(w, what + ": the mask names lanes " + lanes_str(mask & wp.exited) +
                      ", which exited");
  }
  me.site = loc;
  me.op = op;
  me.fn = nullptr;
  me.mask = mask;
  me.value = value;
  me.arg = arg;
  me.width = width;
  me.state = State::kWarp;
  wp.waiting |= 1u << lane;
  if ((wp.waiting & mask) == mask && agrees(w, me, warp, mask)) {
    complete_warp_op(w, me, warp, mask);
    return me.result;
  }
  to_scheduler(w, me, false);
  resumed(w);
  return me.result;
}

void warp_compute(unsigned mask, WarpComputeFn fn, const char* name, const void* in, void* out,
                  std::source_location loc) {
  Worker& w = *tl_worker;
  Thread& me = *w.cur;
  const int warp = me.linear >> 5, lane = me.linear & 31;
  Warp& wp = w.warps[warp];
  if (((mask >> lane) & 1) == 0 || (mask & ~wp.present) || (mask & wp.exited)) {
    const std::string what = std::string(name) + " at " + site_str(loc) + " (lane " +
                             std::to_string(lane) + " of warp " + std::to_string(warp) +
                             ", mask " + hex(mask) + ")";
    if (!((mask >> lane) & 1)) fault_here(w, what + ": the mask does not include the calling lane");
    if (mask & ~wp.present)
      fault_here(w, what + ": the mask names lanes " + lanes_str(mask & ~wp.present) +
                        ", which do not exist (the block has " + std::to_string(w.nthreads) +
                        " threads)");
    fault_here(w, what + ": the mask names lanes " + lanes_str(mask & wp.exited) +
                      ", which exited");
  }
  me.site = loc;
  me.op = WarpOp::kCompute;
  me.fn = fn;
  me.fn_name = name;
  me.in = in;
  me.out = out;
  me.mask = mask;
  me.arg = 0;
  me.width = 32;
  me.state = State::kWarp;
  wp.waiting |= 1u << lane;
  if ((wp.waiting & mask) == mask && agrees(w, me, warp, mask)) {
    complete_warp_op(w, me, warp, mask);
    return;
  }
  to_scheduler(w, me, false);
  resumed(w);
}

void async_copy(void* dst, const void* src, size_t bytes, std::source_location loc) {
  Worker& w = *tl_worker;
  const uintptr_t a = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src);
  if ((bytes != 4 && bytes != 8 && bytes != 16) || a % bytes != 0) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "cp.async of %zu bytes at %s: sizes are 4, 8 or 16 and both "
                  "addresses must be aligned to the size (dst %p, src %p, thread %d)", bytes,
                  site_str(loc).c_str(), dst, src, w.cur->linear);
    fault_here(w, buf);
  }
  w.cur->async_open.push_back(Thread::Copy{dst, src, bytes});
}

void async_commit() {
  Thread& t = *tl_worker->cur;
  t.async_groups.push_back(std::move(t.async_open));
  t.async_open.clear();
}

void async_wait(int pending) {
  flush_async(*tl_worker->cur, pending < 0 ? 0 : static_cast<size_t>(pending));
}

void spin_wait(unsigned ns, std::source_location loc) {
  Worker& w = *tl_worker;
  Thread& me = *w.cur;
  const int workers = config().workers.load();
  if (workers <= 1 || ++me.spins > (uint64_t(10000000000) / (ns ? ns : 1) + 100000)) {
    fault_here(w, "thread " + std::to_string(me.linear) + " spins at " + site_str(loc) +
                      (workers <= 1 ? " on memory that no block that can still run will change "
                                      "(a wait on a block that runs after this one)"
                                    : " for more than ten seconds"));
  }
  std::this_thread::yield();
}

unsigned active_lanes() {
  Worker& w = *tl_worker;
  const Warp& wp = w.warps[w.cur->linear >> 5];
  return wp.present & ~wp.exited;
}

void check_aligned(const void* p, size_t align, size_t size, const char* what,
                   std::source_location loc) {
  if (reinterpret_cast<uintptr_t>(p) % align == 0) return;
  Worker& w = *tl_worker;
  char buf[160];
  std::snprintf(buf, sizeof buf, "misaligned %zu-byte access through %s at %s: address %p is not "
                "%zu-byte aligned (thread %d)", size, what, site_str(loc).c_str(), p, align,
                w.cur->linear);
  fault_here(w, buf);
}

void run_grid(const LaunchInfo& info, void (*body)(void*), void* ctx) {
  HostState& hs = host_state();
  if (hs.pending != cudaSuccess) return;  // an unfetched fault: the device is unusable
  const std::string bad = check_config(info);
  if (!bad.empty()) {
    hs.pending = cudaErrorInvalidConfiguration;
    hs.message = std::string("SIMT emulator: kernel ") + info.kernel + ": invalid launch: " + bad;
    return;
  }
  const uint64_t nblocks = uint64_t(info.grid.x) * info.grid.y * info.grid.z;
  g_stats.launches.fetch_add(1, std::memory_order_relaxed);
  g_stats.blocks.fetch_add(nblocks, std::memory_order_relaxed);
  g_stats.threads.fetch_add(nblocks * info.block.x * info.block.y * info.block.z,
                            std::memory_order_relaxed);
  const int nworkers = static_cast<int>(std::min<uint64_t>(config().workers.load(), nblocks));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<Worker> workers(nworkers);
  auto work = [&](Worker& w) {
    prepare_worker(w, info, body, ctx);
    for (uint64_t b = next++; b < nblocks && !stop.load(); b = next++) {
      const uint3 bid{static_cast<unsigned>(b % info.grid.x),
                      static_cast<unsigned>((b / info.grid.x) % info.grid.y),
                      static_cast<unsigned>(b / (uint64_t(info.grid.x) * info.grid.y))};
      run_block(w, bid, static_cast<int64_t>(b));
      if (w.faulted) {
        stop = true;
        break;
      }
    }
    give_stacks(w.stacks);
  };
  if (nworkers <= 1) {
    work(workers[0]);
  } else {
    std::vector<std::thread> pool;
    for (int k = 1; k < nworkers; ++k) pool.emplace_back(work, std::ref(workers[k]));
    work(workers[0]);
    for (auto& t : pool) t.join();
  }
  for (const Worker& w : workers)
    if (w.faulted) {
      hs.pending = cudaErrorLaunchFailure;
      hs.message = w.fault;
      return;
    }
}

}  // namespace lqlora::emu

// ============================================================ CUDA runtime API (emulated)
// The launchers' only runtime calls. One emulated device: device 0 with the SM count of an
// H100/H200 (LQLORA_EMU_SMS), so that grid-size heuristics pick what they pick on the GPU.
extern "C" {

cudaError_t cudaGetLastError(void) {
  auto& hs = lqlora::emu::host_state();
  const cudaError_t e = hs.pending;
  hs.pending = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return lqlora::emu::host_state().pending; }

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaErrorUnknown";
  }
}

const char* cudaGetErrorString(cudaError_t e) {
  auto& hs = lqlora::emu::host_state();
  if ((e == cudaErrorLaunchFailure || e == cudaErrorInvalidConfiguration) && !hs.message.empty())
    return hs.message.c_str();
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return "unspecified launch failure";
  }
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  auto& hs = lqlora::emu::host_state();
  if (hs.pending != cudaSuccess) return hs.pending;
  std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = lqlora::emu::config().sms.load(); break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 << 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 << 10; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // extern "C"

// ============================================================ control (Python, ctypes)
// lqlora_ext.ops.emu calls these through ctypes.
LQ_EMU_EXPORT void lqlora_emu_set_schedule(int order, unsigned long long seed) {
  lqlora::emu::config().order = order;
  lqlora::emu::config().seed = seed;
}
LQ_EMU_EXPORT int lqlora_emu_get_schedule(unsigned long long* seed) {
  *seed = lqlora::emu::config().seed.load();
  return lqlora::emu::config().order.load();
}
LQ_EMU_EXPORT void lqlora_emu_set_workers(int n) { lqlora::emu::config().workers = n < 1 ? 1 : n; }
LQ_EMU_EXPORT int lqlora_emu_get_workers() { return lqlora::emu::config().workers.load(); }
LQ_EMU_EXPORT void lqlora_emu_set_sms(int n) { lqlora::emu::config().sms = n < 1 ? 1 : n; }
LQ_EMU_EXPORT void lqlora_emu_stats(unsigned long long* out4) {
  out4[0] = lqlora::emu::g_stats.launches.load();
  out4[1] = lqlora::emu::g_stats.blocks.load();
  out4[2] = lqlora::emu::g_stats.threads.load();
  out4[3] = lqlora::emu::g_stats.switches.load();
}
// Size of this module's thread-local block, i.e. of the shared memory poisoned per block.
LQ_EMU_EXPORT unsigned long long lqlora_emu_tls_bytes() {
  lqlora::emu::Worker w;
  lqlora::emu::locate_tls(w);
  return w.tls_size;
}
