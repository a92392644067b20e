// The SIMT emulator's scheduler interface: what the device environment (cuda_emu.h) calls.
// Torch-free; implemented in runtime.cpp.
//
// Execution model. A launch runs its blocks one after another on the calling OS thread (or
// spread over a few worker threads, LQLORA_EMU_WORKERS). A block's CUDA threads are fibers
// with their own stacks (guard page below each); the scheduler resumes every ready fiber in
// the chosen order (forward, reverse or seeded random, re-drawn every round) until it
// blocks at a barrier or warp collective, or exits. A collective completes once every lane
// of its mask has arrived at the same call site with the same operation, mask and width; a
// barrier once every thread of the block is waiting at the same one. Anything else is a
// fault, reported with the kernel, block, threads and source lines involved:
//   - divergent barriers (threads waiting at different __syncthreads),
//   - a barrier reached after some threads of the block exited (or an exit while others wait),
//   - a mask that misses the caller, names a lane that exited or does not exist, or that
//     lanes disagree on (different masks, operations, widths or call sites: a full-mask
//     shuffle under a divergent branch), a shuffle reading a lane outside its mask,
//   - deadlock (nothing can run; who waits where),
//   - misaligned loads through the __ld* intrinsics.
// A fault abandons the launch: its fibers are never resumed, the launch and every later one
// return cudaErrorLaunchFailure until cudaGetLastError() fetches it, and
// cudaGetErrorString() gives the report.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <source_location>

namespace lqlora::emu {

enum class Barrier : int { kSync = 0, kCount, kAnd, kOr };

enum class WarpOp : int {
  kSync = 0,  // __syncwarp
  kShflIdx, kShflUp, kShflDown, kShflXor,
  kBallot, kAny, kAll,
  kReduceAdd, kReduceMin, kReduceMax, kReduceAnd, kReduceOr, kReduceXor,
  kMatchAny,
  kCompute,  // warp_compute: mma.sync, ldmatrix
};

// Blocks the calling thread until the block reaches the barrier; returns the _count / _and /
// _or result (0 for kSync).
int block_barrier(Barrier kind, int pred, std::source_location loc);

// Blocks until every lane of `mask` has arrived; returns this lane's result: the shuffled
// value (arg = source lane / delta / lane mask), the ballot, the reduction (arg = 1 for a
// signed reduction), or the match mask.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         std::source_location loc);

// A warp-wide computation (the tensor-core and matrix-load instructions): every lane of
// `mask` passes its input and output buffers; once all have arrived, fn(ins, outs) runs once
// with the 32 lanes' pointers (nullptr for lanes outside the mask) and every lane resumes.
// `name` (e.g. "mma.sync.m16n8k16") identifies the instruction in reports.
using WarpComputeFn = void (*)(const void* const* ins, void* const* outs);
void warp_compute(unsigned mask, WarpComputeFn fn, const char* name, const void* in, void* out,
                  std::source_location loc);

// cp.async: the copy of `bytes` from global `src` to shared `dst` is queued in the calling
// thread's open group and performed when a later async_wait leaves at most `pending` newer
// groups outstanding (so shared memory read before the wait still holds the old bytes, as on
// the GPU it may); async_commit closes the open group. Alignment is checked at issue.
void async_copy(void* dst, const void* src, size_t bytes, std::source_location loc);
void async_commit();
void async_wait(int pending);

// One iteration of a spin-wait on global memory written by other blocks (__nanosleep). With
// one worker, the blocks it waits for can only be ones that already ran or will run after
// this one: the spin faults at once ("waits on a later block"); with several workers, after
// ten seconds.
void spin_wait(unsigned ns, std::source_location loc);

// Lanes of the caller's warp that exist and have not exited.
unsigned active_lanes();

// A `size`-byte access through `what` (e.g. "__ldcs") at p must be `align`-byte aligned.
void check_aligned(const void* p, size_t align, size_t size, const char* what,
                   std::source_location loc);

struct LaunchInfo {
  const char* kernel;  // the launched expression, e.g. "code_kernel" or "k<4, float>"
  const void* fn;      // the kernel function (locates its __shared__ arrays)
  dim3 grid, block;
  size_t smem;         // dynamic shared memory bytes (the emulator supports none)
  cudaStream_t stream;
  const char* file;    // launch site
  int line;
};

// Runs the grid: body(ctx) once per CUDA thread. Records the result as the calling host
// thread's last error (what cudaGetLastError returns).
void run_grid(const LaunchInfo& info, void (*body)(void*), void* ctx);

}  // namespace lqlora::emu

// Built-in variables of the running CUDA thread: `inline thread_local` (one definition for
// the whole module), set by the scheduler before every resume.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
