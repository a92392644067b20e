"""A built module's kernels: find the tools, dump SASS and resource usage, demangle, and
index the kernels by (family, template arguments).

The tools are looked up as ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``, ``PATH``, then the
PyPI wheels (nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm install ``nvidia/cu13/bin``).
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from .sass import Instr, parse_function, parse_res_usage, split_functions, spill_bytes_text


class ToolError(RuntimeError):
    """A tool or the module is missing or failed; the message says which and how to fix."""


def find_tool(name: str) -> Optional[str]:
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(os.path.join(os.environ[env], "bin", name))
    cands.append(os.path.join("/usr/local/cuda/bin", name))
    w = shutil.which(name)
    if w:
        cands.append(w)
    for sp in sys.path:
        cands += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "bin", name)))
        cands += sorted(glob.glob(os.path.join(sp, "nvidia", "cuda_*", "bin", name)))
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def default_module() -> str:
    """The installed lqlora_ext/_C*.so, found without importing the package (no torch)."""
    spec = importlib.util.find_spec("lqlora_ext")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, "_C*.so")))
        if hits:
            return hits[0]
    raise ToolError("no built lqlora_ext/_C*.so found (is lqlora_ext installed? pass --so PATH)")


def _run(args: List[str], what: str) -> str:
    env = dict(os.environ)
    nvdisasm = find_tool("nvdisasm")  # cuobjdump -sass runs it; without it, it prints no SASS
    if nvdisasm:
        env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    try:
        p = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    except OSError as e:
        raise ToolError(f"{what}: cannot run {args[0]}: {e}") from e
    if p.returncode != 0:
        raise ToolError(f"{what}: {' '.join(args[:3])} ... exited {p.returncode}: "
                        f"{p.stderr.strip()[:400]}")
    return p.stdout


def list_arches(cuobjdump: str, so: str) -> List[str]:
    """The SASS architectures the module holds cubins for ([] for a CPU-only build)."""
    try:
        out = _run([cuobjdump, "-lelf", so], "cuobjdump -lelf")
    except ToolError as e:
        if "does not contain device code" in str(e):
            return []
        raise
    return sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", out)))


def dump_sass(cuobjdump: str, so: str, arch: str, functions: Optional[List[str]] = None) -> str:
    """SASS of every kernel for ``arch`` (or only the mangled ``functions``)."""
    args = [cuobjdump, "-sass", "-arch", arch]
    if functions:
        args += ["-fun", ",".join(functions)]
    out = _run(args + [so], "cuobjdump -sass")
    if "Function :" in out and not re.search(r"/\*[0-9a-f]{4}\*/", out):
        raise ToolError("cuobjdump printed kernel names but no instructions: it needs nvdisasm "
                        "beside it or on PATH (`pip install nvidia-cuda-nvdisasm`)")
    return out


def dump_res_usage(cuobjdump: str, so: str, arch: str) -> str:
    return _run([cuobjdump, "-res-usage", "-arch", arch, so], "cuobjdump -res-usage")


def demangle(names: List[str]) -> Dict[str, str]:
    """Itanium-ABI demangling through c++filt (or cu++filt); identity when neither runs."""
    tool = find_tool("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    p = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    outs = p.stdout.splitlines() if p.returncode == 0 else []
    if len(outs) != len(names):
        return {n: n for n in names}
    return dict(zip(names, outs))


@dataclasses.dataclass
class Kernel:
    """One kernel of the module: names, template arguments, resource usage, and its SASS
    section (parsed on first use of ``instrs``)."""

    mangled: str
    demangled: str
    family: str
    targs: Tuple[str, ...]
    section: str
    res: Dict[str, int]
    _instrs: Optional[List[Instr]] = None

    @property
    def instrs(self) -> List[Instr]:
        if self._instrs is None:
            self._instrs = parse_function(self.section)
        return self._instrs

    def spills(self) -> Tuple[int, int]:
        return spill_bytes_text(self.section)


def split_demangled(d: str) -> Tuple[str, Tuple[str, ...]]:
    """``void ns::kern<4, __nv_bfloat16, 1, 4>(args)`` -> ("kern", ("4", "__nv_bfloat16", "1", "4"))."""
    d = d.replace("(anonymous namespace)::", "")
    head = d.split("(")[0] if "(" in d else d
    head = re.sub(r"^\S+\s+(?=\S*::)", "", head)  # return type
    targs: Tuple[str, ...] = ()
    if head.endswith(">"):
        depth, i = 0, len(head) - 1
        while i >= 0:
            depth += {">": 1, "<": -1}.get(head[i], 0)
            if depth == 0:
                break
            i -= 1
        inner, head = head[i + 1:-1], head[:i]
        parts, cur, dd = [], "", 0
        for ch in inner:
            dd += {"<": 1, ">": -1}.get(ch, 0)
            if ch == "," and dd == 0:
                parts.append(cur.strip())
                cur = ""
            else:
                cur += ch
        parts.append(cur.strip())
        targs = tuple(p for p in parts if p)
    family = head.split("::")[-1].strip()
    return family, targs


def load_kernels(sass_text: str, res_text: str) -> List[Kernel]:
    """Kernels of one SASS dump (+ its -res-usage dump), sorted by mangled name."""
    secs = split_functions(sass_text)
    res = parse_res_usage(res_text)
    names = sorted(set(secs) | set(res))
    dm = demangle(names)
    out = []
    for n in names:
        fam, targs = split_demangled(dm[n])
        out.append(Kernel(n, dm[n], fam, targs, secs.get(n, ""), res.get(n, {})))
    return out


def index(kernels: List[Kernel]) -> Dict[Tuple[str, Tuple[str, ...]], Kernel]:
    return {(k.family, k.targs): k for k in kernels}
