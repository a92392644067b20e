// Keeps a CUDA build's and the SIMT emulator's glibc floor at torch's own (manylinux_2_28)
// when they are linked on a system with glibc >= 2.34.
//
// Why: glibc 2.34 moved libpthread, libdl and librt into libc.so.6 and gave the moved
// functions a new default version, GLIBC_2.34. The static CUDA runtime we link
// (libcudart_static.a, so the module also loads under a CPU-only torch) calls 46 of them
// (pthread_create, dlopen, sem_wait, shm_open, ...); linked here, each reference binds to
// its @GLIBC_2.34 version and the module refuses to load on glibc < 2.34, which makes the
// wheel manylinux_2_34 instead of manylinux_2_28. The emulator module (csrc/emu) calls a few
// of them itself (pthread_key_create & co. for per-thread host state, dladdr to find its own
// file), with the same effect.
//
// How: CMakeLists.txt's lqlora_glibc_floor(target) links with `--wrap=NAME` for every NAME
// listed below (it reads this list), so those references go to `__wrap_NAME`, defined here as one `jmp` to NAME bound,
// by `.symver`, to the version that was NAME's default before glibc 2.34 (the newest one
// below 2.34 that this glibc still exports as a compat symbol; they are the same functions).
// A bare jmp keeps every argument register and the caller's return address, which dlopen
// and dlsym(RTLD_NEXT) read to find the calling object. On glibc < 2.34 those versions live
// in libpthread.so.0 / libdl.so.2 / librt.so.1, which CMakeLists.txt adds as DT_NEEDED so
// they are loaded wherever the module is (on newer glibc they are empty stubs).
//
// Only x86-64 (the versions are per-architecture) and only when CMake defines
// LQLORA_CUDART_GLIBC_WRAP: a CPU-only _C, a sanitized _emu, or a build inside a manylinux_2_28 image
// (glibc 2.28), compiles this file to nothing.
#if defined(LQLORA_CUDART_GLIBC_WRAP) && defined(__x86_64__)

#define LQ_GLIBC_FLOOR(name, version)                      \
  __asm__(".pushsection .text\n"                          \
          ".globl __wrap_" #name "\n"                     \
          ".hidden __wrap_" #name "\n"                    \
          ".type __wrap_" #name ", @function\n"           \
          "__wrap_" #name ":\n"                           \
          "  jmp lqlora_glibc_old_" #name "@PLT\n"        \
          ".size __wrap_" #name ", . - __wrap_" #name "\n" \
          ".symver lqlora_glibc_old_" #name ", " #name "@" version "\n" \
          ".popsection\n");

// One line per symbol: CMakeLists.txt parses `LQ_GLIBC_FLOOR(name, ...)` lines from here.
// The set is what `objdump -T` shows at GLIBC_2.34 for a CUDA 13.0 build and the emulator
// module without the wrap.
LQ_GLIBC_FLOOR(dladdr, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(dlclose, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(dlerror, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(dlmopen, "GLIBC_2.3.4")
LQ_GLIBC_FLOOR(dlopen, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(dlsym, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(dlvsym, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_condattr_setpshared, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_create, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_detach, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_getspecific, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_join, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_key_create, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_key_delete, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_kill, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_mutex_trylock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_mutexattr_destroy, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_mutexattr_init, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_mutexattr_setpshared, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_mutexattr_settype, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_once, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_destroy, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_init, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_rdlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_timedrdlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_timedwrlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_tryrdlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_trywrlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_unlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlock_wrlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlockattr_destroy, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlockattr_init, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_rwlockattr_setpshared, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_setspecific, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_spin_destroy, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_spin_init, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_spin_lock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_spin_trylock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(pthread_spin_unlock, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(sem_destroy, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(sem_init, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(sem_post, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(sem_timedwait, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(sem_trywait, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(sem_wait, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(shm_open, "GLIBC_2.2.5")
LQ_GLIBC_FLOOR(shm_unlink, "GLIBC_2.2.5")

#endif
