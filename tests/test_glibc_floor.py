"""The compiled modules (_C, and the SIMT emulator's _emu, both shipped in the wheels) keep
torch's manylinux_2_28 floor (glibc 2.28, GLIBCXX 3.4.25, CXXABI 1.3.11) however new the
build machine is: csrc/glibc_floor.cpp for libstdc++'s headers,
csrc/cuda/cudart_glibc_floor.cpp for the static CUDA runtime and the emulator's own
pthread/dl calls."""
import glob
import os
import re
import shutil
import subprocess

import pytest

import lqlora_ext._C as _C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR_SRC = os.path.join(ROOT, "csrc", "cuda", "cudart_glibc_floor.cpp")
# manylinux_2_28's ceilings (PEP 600 / auditwheel's policy for glibc 2.28, gcc 8).
CEILING = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 25), "CXXABI": (1, 3, 11)}

needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils")


def _versions(path):
    """{'GLIBC': {(2, 17), ...}, ...}: the symbol versions a binary's imports require."""
    out = subprocess.run(["objdump", "-T", path], capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for lib, ver in re.findall(r"\((GLIBC|GLIBCXX|CXXABI)_([0-9.]+)\)", out):
        found.setdefault(lib, set()).add(tuple(int(p) for p in ver.split(".")))
    return found


def _modules():
    """_C, and _emu where it was built beside it (a sanitized _emu is never installed)."""
    here = os.path.dirname(_C.__file__)
    return [_C.__file__] + sorted(glob.glob(os.path.join(here, "_emu*.so")))


@needs_objdump
@pytest.mark.parametrize("module", _modules(), ids=lambda p: os.path.basename(p).split(".")[0])
def test_module_stays_within_manylinux_2_28(module):
    found = _versions(module)
    assert found.get("GLIBC"), "objdump found no versioned glibc imports: wrong file?"
    for lib, ceiling in CEILING.items():
        over = sorted(v for v in found.get(lib, ()) if v > ceiling)
        assert not over, f"{module} needs {lib} {over} (> {ceiling})"


def _wrapped_symbols():
    text = open(FLOOR_SRC).read()
    return re.findall(r"^LQ_GLIBC_FLOOR\((\w+), \"(GLIBC_[0-9.]+)\"\)", text, re.M)


def test_floor_list_is_well_formed():
    syms = _wrapped_symbols()
    assert len(syms) == len({s for s, _ in syms}) >= 40
    for _, ver in syms:  # every pinned version predates 2.34
        assert tuple(int(p) for p in ver[6:].split(".")) < (2, 34)


def _cuda_home():
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "lib64", "libcudart_static.a")):
            return home
    return None


@needs_objdump
@pytest.mark.skipif(_cuda_home() is None or shutil.which("g++") is None,
                    reason="needs a CUDA toolkit (libcudart_static.a) and g++")
def test_wrapped_static_cudart_runs(tmp_path):
    """The CMake recipe on a standalone program: static cudart linked with the same --wrap
    list must import nothing at GLIBC_2.34 and still work (cudaGetDeviceCount goes through
    pthread_once, dlopen("libcuda.so.1") and dlsym: a device count, or a clean 'no driver'
    error on a machine without one)."""
    home = _cuda_home()
    main = tmp_path / "main.cpp"
    main.write_text(
        '#include <cstdio>\n#include <cuda_runtime_api.h>\n'
        'int main() { int n = -1; cudaError_t e = cudaGetDeviceCount(&n);\n'
        '  std::printf("%d %d %s\\n", (int)e, n, cudaGetErrorName(e)); return 0; }\n')
    exe = tmp_path / "probe"
    wraps = [f"-Wl,--wrap={s}" for s, _ in _wrapped_symbols()]
    cmd = ["g++", "-O1", "-DLQLORA_CUDART_GLIBC_WRAP=1", f"-I{home}/include", str(main),
           FLOOR_SRC, *wraps, f"-L{home}/lib64", "-l:libcudart_static.a",
           "-Wl,--push-state,--no-as-needed", "-l:libpthread.so.0", "-l:libdl.so.2",
           "-l:librt.so.1", "-Wl,--pop-state", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    dyn = subprocess.run(["objdump", "-T", str(exe)], capture_output=True, text=True).stdout
    at_234 = set(re.findall(r"\(GLIBC_2\.34\)\s+(\w+)", dyn))
    # An executable's own entry (__libc_start_main) is versioned 2.34 here; a module has none.
    assert at_234 <= {"__libc_start_main"}, sorted(at_234)
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    code, count, name = run.stdout.split()
    if code == "0":
        assert int(count) >= 1
    else:  # no GPU here: the runtime's own error, reached through the wrapped dl*/pthread*
        assert name in {"cudaErrorNoDevice", "cudaErrorInsufficientDriver"}, run.stdout
