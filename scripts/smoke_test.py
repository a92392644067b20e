#!/usr/bin/env python3
"""Install each built wheel into a fresh virtual environment with a matching torch and prove
it works: import, quantize, dequantize and qmatmul on the CPU, and the same on a GPU when
torch sees one.

    python scripts/smoke_test.py dist/lqlora_ext-0.1.0+cpu.torch2.13-*.whl
    python scripts/smoke_test.py --system-torch --no-deps dist/*.whl   # offline, the torch here

The torch to install defaults to the exact version the wheel was compiled against (read from
the wheel's lqlora_ext/_build_info.py, e.g. ``torch==2.13.0+cpu``; where that local version
is not published, as for PyPI's CUDA builds, the public one, ``torch==2.11.0``); ``--torch
SPEC`` overrides it. ``--system-torch`` installs no torch: the venv sees the packages of the
interpreter running this script (its torch), after its own; ``--no-deps`` installs the wheel
alone (importing and the ops need only torch). A CUDA wheel is also tested with a CPU-only torch: its CPU ops must
work and its CUDA kernels must be registered (cudart is linked statically).

Checks (run inside the venv, from a directory outside the source tree):
- the package imports from the venv's own site-packages (not a source tree or an editable
  install beside the torch) and reports the build it came from;
- the CUDA dispatch key holds our kernels exactly when the wheel is a CUDA build;
- quantize -> dequantize equals the package's pure-PyTorch reference bit for bit;
- qmatmul (M = 1 decode path, M = 7, ragged K = 100, LoRA epilogue, bf16 activations) is
  within twice torch's own error at the same precision (against a float64 product);
- with a GPU: the same on CUDA, and CUDA quantize equals CPU quantize bit for bit.
Exit status 1 if any wheel fails.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

CHECK = r'''
import json, os, sys
import torch
import lqlora_ext as lq
from lqlora_ext import _build_info as info
from lqlora_ext.ops import reference as R

EPS = {dt: torch.finfo(dt).eps for dt in (torch.float32, torch.bfloat16)}
rep = {"module": lq.__file__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
       "built_torch": info.TORCH_VERSION, "built_cuda": info.CUDA_VERSION or None,
       "archs": info.CUDA_ARCHS or None, "checks": []}
assert os.path.realpath(lq.__file__).startswith(os.path.realpath(sys.prefix) + os.sep), \
    f"imported {lq.__file__}, not the wheel installed in {sys.prefix}"
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("lqlora::qmatmul", "CUDA")
assert has_cuda == bool(info.CUDA_VERSION), \
    f"CUDA kernels registered: {has_cuda}, but the build says CUDA {info.CUDA_VERSION!r}"
rep["cuda_kernels_registered"] = has_cuda


def within_baseline(got, x, w, a=None, b=None, s=1.0, what=""):
    """|got - exact| <= 2 x |torch's own product at x's precision - exact|, floored at one
    rounding of the largest |x| @ |w|^T term."""
    def dense(x, w, a, b):
        y = x @ w.to(x.dtype).t()
        return y if a is None else y + s * (x @ a.to(x.dtype).t()) @ b.to(x.dtype).t()
    d = lambda t: None if t is None else t.double()
    exact = dense(x.double(), w.double(), d(a), d(b))
    base = (dense(x, w, a, b).double() - exact).abs().max().item()
    mag = dense(x.abs().double(), w.abs().double(), None if a is None else d(a).abs(),
                None if b is None else d(b).abs()).max().item()
    tol = 2.0 * max(base, EPS[x.dtype] * mag)
    err = (got.double() - exact).abs().max().item()
    assert err <= tol, f"{what}: error {err:.3e} > 2 x baseline {base:.3e} (floor {EPS[x.dtype] * mag:.3e})"
    rep["checks"].append(f"{what}: err {err:.2e} <= {tol:.2e}")


def run(device):
    g = torch.Generator().manual_seed(0)
    for bits, (n, k) in [(4, (96, 160)), (3, (53, 100)), (2, (64, 256)), (8, (40, 96))]:
        cfg = lq.QuantConfig(bits=bits)
        w = torch.randn(n, k, generator=g)
        qw = lq.quantize(w.to(device), cfg)
        deq = qw.dequantize()
        lv = lq.nf_code(bits)
        args = (bits, cfg.block_size, cfg.scale_bits, cfg.scale_block_size)
        ref = R.dequantize(*R.quantize(w, lv, bits, cfg.block_size, cfg.scale_bits,
                                       cfg.scale_block_size, cfg.scale_dtype), lv, n, k, *args)
        assert torch.equal(deq.cpu(), ref), f"{device} NF{bits} {n}x{k}: dequantize(quantize(w)) != reference"
        rep["checks"].append(f"{device} NF{bits} {n}x{k}: quantize+dequantize == reference")
        for m in (1, 7):
            x = torch.randn(m, k, generator=g).to(device)
            within_baseline(lq.qmatmul(x, qw), x, deq, what=f"{device} qmatmul NF{bits} {n}x{k} M={m}")
        a, b = torch.randn(8, k, generator=g).to(device), torch.randn(n, 8, generator=g).to(device)
        x = torch.randn(3, k, generator=g).to(device)
        within_baseline(lq.qmatmul(x, qw, a, b, lora_scale=0.5), x, deq, a, b, 0.5,
                        what=f"{device} qmatmul+LoRA NF{bits} {n}x{k}")
        xb = x.bfloat16()
        within_baseline(lq.qmatmul(xb, qw), xb, deq, what=f"{device} qmatmul bf16 NF{bits} {n}x{k}")
        if device == "cuda":
            qc = lq.quantize(w, cfg)
            same = all(torch.equal(p.cpu(), q) for p, q in
                       zip((qw.qcodes, qw.qscales, qw.scale2, qw.offset),
                           (qc.qcodes, qc.qscales, qc.scale2, qc.offset)))
            assert same, f"CUDA quantize NF{bits} {n}x{k} differs from CPU quantize"
            rep["checks"].append(f"cuda NF{bits} {n}x{k}: quantize == CPU quantize (bit-exact)")


run("cpu")
# The SIMT emulator build of the CUDA kernels, when the wheel has it: same bits as the CPU.
rep["emulator"] = bool(getattr(info, "EMU", False))
if rep["emulator"]:
    from lqlora_ext.ops import emu
    E = emu.load()
    w = torch.randn(53, 100, generator=torch.Generator().manual_seed(1))
    cfg = lq.QuantConfig(bits=3, block_size=16)
    args = (3, 16, cfg.scale_bits, cfg.scale_block_size)
    lv = lq.nf_code(3)
    got = E.quantize(w, lv, *args, cfg.scale_dtype)
    want = torch.ops.lqlora.quantize(w, lv, *args, cfg.scale_dtype)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "emulated quantize != CPU"
    x = torch.randn(2, 100)
    within_baseline(E.qmatmul(x, *want, lv, 53, *args, None, None, 1.0), x,
                    torch.ops.lqlora.dequantize(*want, lv, 53, 100, *args, torch.float32),
                    what="emulated qmatmul NF3 53x100")
    rep["checks"].append("emulator: quantize == CPU quantize (bit-exact)")
rep["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
if rep["gpu"] is not None:
    assert has_cuda, "a GPU is present but this wheel has no CUDA kernels"
    run("cuda")
    torch.cuda.synchronize()
print("SMOKE_REPORT " + json.dumps(rep))
'''


def build_info(wheel: str) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        path = next(n for n in zf.namelist() if n.endswith("lqlora_ext/_build_info.py"))
        ns: dict = {}
        exec(zf.read(path).decode(), ns)
    return ns


def link_packages(py: str) -> None:
    """Let the venv of ``py`` import this interpreter's packages (its torch), after its own.

    Not ``venv --system-site-packages``: that reaches only the *base* interpreter's
    site-packages, so a torch installed in a venv that runs this script stays invisible; and
    it processes the .pth files there, where an editable ``pip install -e .`` of lqlora_ext
    keeps an import hook that would load the source tree instead of the wheel under test. A
    plain directory line in a .pth file appends that directory to sys.path and nothing else.
    """
    import torch  # noqa: F401  (the torch the wheel is to run with must be importable here)

    dirs = [os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))]
    dirs += [os.path.abspath(d) for d in sys.path
             if d.endswith(("site-packages", "dist-packages")) and os.path.isdir(d)]
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "_lqlora_smoke_system_torch.pth"), "w") as f:
        f.write("".join(d + "\n" for d in dict.fromkeys(dirs) if d != purelib))


def sh(cmd, **kw):
    print("  $ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def smoke(wheel: str, args) -> dict:
    info = build_info(wheel)
    root = tempfile.mkdtemp(prefix="lqlora-smoke-", dir=args.venv_root)
    venv = os.path.join(root, "venv")
    t0 = time.time()
    # No pip inside the venv (no ensurepip needed, faster): this interpreter's pip installs
    # into it (pip >= 22.3's --python).
    sh([sys.executable, "-m", "venv", "--without-pip", venv])
    py = os.path.join(venv, "bin", "python")
    if args.system_torch:
        link_packages(py)
    pip = [sys.executable, "-m", "pip", "--python", py, "install", "-q",
           "--disable-pip-version-check"]
    if args.no_deps:
        pip += ["--no-deps", "--no-index"]
    built = info["TORCH_VERSION"]
    torch_spec = [] if args.system_torch else [args.torch or f"torch=={built}"]
    try:
        sh([*pip, os.path.abspath(wheel), *torch_spec])
    except subprocess.CalledProcessError:
        # PyPI's default CUDA torch reports __version__ "2.11.0+cu130" but is published as
        # plain 2.11.0, so the exact local version cannot resolve there: retry with the public
        # version (the import-time check still holds the torch minor).
        if args.system_torch or args.torch or "+" not in built:
            raise
        torch_spec = [f"torch=={built.split('+')[0]}"]
        print(f"  note: torch=={built} not found; retrying with {torch_spec[0]}", flush=True)
        sh([*pip, os.path.abspath(wheel), *torch_spec])
    t1 = time.time()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LQLORA_CUDA")}
    script = os.path.join(root, "check.py")
    with open(script, "w") as f:
        f.write(CHECK)
    proc = subprocess.run([py, script], cwd=root, env=env, capture_output=True, text=True)
    t2 = time.time()
    report = {"wheel": os.path.basename(wheel), "install_s": round(t1 - t0, 1),
              "check_s": round(t2 - t1, 1), "ok": proc.returncode == 0}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("SMOKE_REPORT ")), None)
    if line:
        report.update(json.loads(line[len("SMOKE_REPORT "):]))
    if proc.returncode != 0:
        report["error"] = (proc.stdout + proc.stderr)[-4000:]
    if not args.keep:
        subprocess.run(["rm", "-rf", root])
    else:
        report["venv"] = venv
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs="+")
    ap.add_argument("--torch", help="torch requirement to install (default: the exact torch "
                                    "the wheel was built against)")
    ap.add_argument("--system-torch", action="store_true",
                    help="install no torch: the venv sees this interpreter's packages (its torch)")
    ap.add_argument("--no-deps", action="store_true",
                    help="install the wheel alone, offline (--no-deps --no-index)")
    ap.add_argument("--venv-root", default=None, help="where to create the venvs (default: TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the venvs")
    ap.add_argument("--json", help="also write the reports to this file")
    args = ap.parse_args(argv)
    reports = []
    for wheel in args.wheels:
        print(f"== smoke: {os.path.basename(wheel)}", flush=True)
        r = smoke(wheel, args)
        reports.append(r)
        if r["ok"]:
            print(f"PASS {r['wheel']}: torch {r['torch']}, built for {r['built_torch']}, "
                  f"CUDA kernels {'registered' if r['cuda_kernels_registered'] else 'absent'}, "
                  f"GPU {r['gpu'] or 'none'}; {len(r['checks'])} checks; "
                  f"install {r['install_s']} s, checks {r['check_s']} s", flush=True)
        else:
            print(f"FAIL {r['wheel']}:\n{r['error']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
