// Keeps the module's glibc floor at torch's own (manylinux_2_28, glibc 2.28) when it is built
// on a newer system.
//
// gcc >= 11's libstdc++ headers read `__libc_single_threaded` (glibc 2.32,
// <sys/single_threaded.h>) before every shared_ptr / locale refcount update whenever the
// build machine's glibc has that header. That one reference makes the module need glibc
// 2.32, so CMakeLists.txt renames it (-D__libc_single_threaded=lqlora_libc_single_threaded)
// and this file defines the renamed flag, hidden, as 0: "another thread may exist", so every
// update stays atomic, which is what libstdc++ does on glibc < 2.32 anyway. Inside a
// manylinux_2_28 image the header does not exist and this is inert.
extern "C" __attribute__((visibility("hidden"))) char lqlora_libc_single_threaded = 0;
