"""Hugging Face safetensors checkpoints, one tensor at a time.

:class:`CheckpointDir` reads a model directory (``config.json`` plus ``model.safetensors``,
or shards listed by ``model.safetensors.index.json``): every shard's header is checked up
front (unreadable, truncated, a tensor the index names but the shard lacks), and each
tensor is read on its own through ``safe_open``, whose memory map is closed again right
after, so file pages never pile up in the process's resident set however large the model.

:func:`write_safetensors` writes one safetensors file from tensors produced one after
another (the header is computed from their known shapes first), into a temporary file that
replaces the target only once complete and flushed: a killed writer leaves no torn file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from typing import (Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple,
                    Union)

import torch

CONFIG = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
             "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file`` (absolute path), safetensors dtype name, shape and
    the absolute byte range ``[start, end)`` of its data in the file."""

    key: str
    file: str
    dtype: str
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """``({key: TensorInfo} in data order, __metadata__)`` of a safetensors file, after
    checking that the header parses, every tensor's byte range matches its dtype and
    shape, and the file is as long as the header says (a cut-off download is caught
    here, not as garbage weights later)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header "
                                      f"length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out: Dict[str, TensorInfo] = {}
    for key, e in header.items():
        try:
            dtype, shape = e["dtype"], tuple(int(s) for s in e["shape"])
            s, t = (int(v) for v in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}") from None
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype}")
        info = TensorInfo(key, os.path.abspath(path), dtype, shape, base + s, base + t)
        want = info.numel * torch.tensor([], dtype=ST_DTYPES[dtype]).element_size()
        if t < s or t - s != want:
            raise CheckpointError(f"{path}: tensor {key!r} {dtype} {list(shape)} should have "
                                  f"{want} bytes, its header says {t - s} (corrupt file)")
        if info.end > size:
            raise CheckpointError(f"{path}: truncated ({size} bytes; tensor {key!r} ends at "
                                  f"byte {info.end})")
        out[key] = info
    return dict(sorted(out.items(), key=lambda kv: kv[1].start)), meta


class CheckpointDir:
    """A Hugging Face model directory read tensor by tensor.

    ``tensors``: ``{key: TensorInfo}`` over all shards (shards in index order, tensors in
    file order); ``config``: the parsed ``config.json``. Raises :class:`CheckpointError`
    for a directory that is not a model, a missing or corrupt shard, or an index that
    names tensors a shard does not hold.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model "
                                  f"directory with {CONFIG} and safetensors weights)")
        cpath = os.path.join(self.path, CONFIG)
        if not os.path.isfile(cpath):
            raise CheckpointError(f"{path}: not a Hugging Face model directory (no {CONFIG})")
        try:
            with open(cpath) as f:
                self.config = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{cpath}: corrupt JSON ({e})") from None
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{cpath}: not a model config (not a JSON object)")
        self.files = self._shard_files()
        self.tensors: Dict[str, TensorInfo] = {}
        for f, expected in self.files.items():
            infos, _ = read_header(f)
            missing = [k for k in (expected or ()) if k not in infos]
            if missing:
                raise CheckpointError(f"{f}: lacks tensor {missing[0]!r} that {SAFE_INDEX} "
                                      f"places there ({len(missing)} missing; corrupt or "
                                      f"mismatched shard)")
            for k, info in infos.items():
                if expected is None or k in expected:
                    self.tensors[k] = info

    def _shard_files(self) -> Dict[str, Optional[set]]:
        """``{shard path: keys the index puts there (None: a single file)}``."""
        ipath = os.path.join(self.path, SAFE_INDEX)
        if os.path.isfile(ipath):
            try:
                with open(ipath) as f:
                    wmap = json.load(f)["weight_map"]
                if not isinstance(wmap, dict) or not wmap:
                    raise ValueError("empty weight_map")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{ipath}: corrupt index ({e})") from None
            files: Dict[str, set] = {}
            for k, fn in wmap.items():
                if not isinstance(fn, str) or os.path.basename(fn) != fn:
                    raise CheckpointError(f"{ipath}: tensor {k!r} maps to {fn!r}, not a file "
                                          f"name in the directory")
                files.setdefault(os.path.join(self.path, fn), set()).add(k)
            for fpath, keys in files.items():
                if not os.path.isfile(fpath):
                    raise CheckpointError(f"{fpath}: missing shard (listed in {SAFE_INDEX} "
                                          f"for {len(keys)} tensors, e.g. {sorted(keys)[0]!r})")
            return dict(files)
        single = os.path.join(self.path, SAFE_WEIGHTS)
        if os.path.isfile(single):
            return {single: None}
        other = [f for f in os.listdir(self.path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = (f"; found {other[0]}: re-save it with save_pretrained(safe_serialization=True)"
                if other else "")
        raise CheckpointError(f"{self.path}: no {SAFE_WEIGHTS} or {SAFE_INDEX} (only "
                              f"safetensors checkpoints are read){hint}")

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: the checkpoint has no tensor {key!r}") from None

    def load(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored (its own dtype), on the CPU. The file's memory map
        is opened for this tensor only and closed before returning."""
        from safetensors import safe_open

        info = self.info(key)
        try:
            with safe_open(info.file, framework="pt", device="cpu") as f:
                t = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{info.file}: cannot read tensor {key!r} ({e})") from None
        if tuple(t.shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor {key!r} read as {tuple(t.shape)}, "
                                  f"header says {info.shape}")
        return t

    def copy_raw(self, key: str, out, chunk: int = 16 << 20) -> None:
        """Write the stored bytes of ``key`` to the binary file ``out`` (plain reads in
        ``chunk``-byte pieces: no memory map, no dtype conversion)."""
        info = self.info(key)
        with open(info.file, "rb") as f:
            f.seek(info.start)
            left = info.nbytes
            while left:
                buf = f.read(min(chunk, left))
                if not buf:
                    raise CheckpointError(f"{info.file}: truncated inside tensor {key!r}")
                out.write(buf)
                left -= len(buf)

    def fingerprint(self, key: str, sample: int = 1 << 16) -> str:
        """A cheap identity of one stored tensor: sha256 of its dtype, shape and up to
        three ``sample``-byte pieces (start, middle, end). Tells a different model's
        tensor apart without reading all of it."""
        info = self.info(key)
        h = hashlib.sha256(f"{info.dtype}{list(info.shape)}".encode())
        with open(info.file, "rb") as f:
            for off in sorted({0, max(0, info.nbytes // 2 - sample // 2),
                               max(0, info.nbytes - sample)}):
                f.seek(info.start + off)
                h.update(f.read(min(sample, info.nbytes - off)))
        return h.hexdigest()[:32]


# ------------------------------------------------------------------------------ writing
Source = Union[torch.Tensor, Callable[[object], None]]


@dataclasses.dataclass
class Entry:
    """One tensor of a file being written: its key, dtype, shape and ``source``, a
    tensor or a callable writing exactly the tensor's bytes to a binary file."""

    key: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    source: Source

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bf16 included)."""
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: str, entries: Sequence[Entry],
                      metadata: Optional[Dict[str, str]] = None) -> int:
    """Write ``entries`` in order as the safetensors file ``path``, atomically (temporary
    sibling, flushed, then renamed over ``path``). Each source is materialized only while
    its bytes are written. Returns the file size."""
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for e in entries:
        if e.dtype not in ST_NAMES:
            raise ValueError(f"write_safetensors: tensor {e.key!r} has unsupported dtype "
                             f"{e.dtype}")
        header[e.key] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # the data section starts 8-byte aligned
    with atomic_file(path, "wb") as f:
        f.write(len(hbytes).to_bytes(8, "little"))
        f.write(hbytes)
        for e in entries:
            start = f.tell()
            if isinstance(e.source, torch.Tensor):
                t = e.source
                if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                    raise ValueError(f"write_safetensors: tensor {e.key!r} is {t.dtype} "
                                     f"{tuple(t.shape)}, planned {e.dtype} {e.shape}")
                f.write(tensor_bytes(t))
            else:
                e.source(f)
            if f.tell() - start != e.nbytes:
                raise ValueError(f"write_safetensors: tensor {e.key!r} wrote "
                                 f"{f.tell() - start} bytes, planned {e.nbytes}")
    return 8 + len(hbytes) + off


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb") -> Iterator:
    """A file to write ``path`` through: a temporary sibling, flushed, fsynced and renamed
    over ``path`` when the block ends cleanly (with the permissions an ordinary ``open``
    would give; mkstemp makes files private to their owner), removed when it raises. A
    reader never sees a half-written ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def is_complete(path: str) -> bool:
    """True when ``path`` is a readable safetensors file as long as its header says."""
    try:
        read_header(path)
        return True
    except CheckpointError:
        return False


def atomic_write_json(path: str, obj, **kw) -> None:
    """``json.dump(obj)`` to ``path`` through a flushed temporary sibling and a rename."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, **kw)


def shard_names(n: int, prefix: str = "model") -> List[str]:
    """Hugging Face shard file names: ``model.safetensors`` for one file, else
    ``model-00001-of-0000n.safetensors``..."""
    if n == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def pack_shards(sizes: Iterable[int], max_bytes: int) -> List[int]:
    """Shard number of each item, in order: a new shard starts when the next item would
    push the current one past ``max_bytes`` (an item larger than that gets its own)."""
    out, cur, acc = [], 0, 0
    for s in sizes:
        if acc and acc + s > max_bytes:
            cur, acc = cur + 1, 0
        out.append(cur)
        acc += s
    return out


def read_hf_quantized(path: str, model) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """``({"modules": ...}, state dict)`` of a Hugging Face-format LQ-LoRA directory
    (``config.json`` with quantization_config "lqlora", one or more safetensors shards),
    keyed as ``model``'s state dict: the base-model prefix added or dropped as needed,
    tied tensors (an omitted ``lm_head.weight``) filled from their stored twin. For
    :func:`~lqlora_ext.load_quantized`, which then checks it against the model."""
    from .layout import HINT_KEY, PLACEHOLDER, LayoutError, validate_modules, verify_hf

    src = CheckpointDir(path)
    qc = src.config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "lqlora":
        raise CheckpointError(f"{path}: config.json has no quantization_config with "
                              f"quant_method 'lqlora'")
    # The checks from_pretrained makes: strict layout both ways, digests, finite adapters.
    cpath = os.path.join(src.path, CONFIG)
    try:
        modules = validate_modules(qc.get("modules"), f"{cpath}: quantization_config")
        verify_hf(modules, qc.get("digests"), qc.get("digest"), qc.get("format_version"),
                  {k: (i.torch_dtype, i.shape) for k, i in src.tensors.items()}, src.load,
                  where=path)
    except LayoutError as e:
        raise CheckpointError(str(e)) from None
    skip = {HINT_KEY, *(f"{m}.{PLACEHOLDER}" for m in modules)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    own = model.state_dict(keep_vars=True)
    groups: Dict[int, List[str]] = {}
    for k, t in own.items():
        groups.setdefault(id(t), []).append(k)
    # LQ tensors the model does not have yet (its Linears are still dense) keep their name.
    wanted = list(own) + [f"{m}.{s}" for m in modules for s in
                          ("qcodes", "qscales", "scale2", "offset", "lora_A", "lora_B")]
    state: Dict[str, torch.Tensor] = {}
    for k in wanted:
        for c in (k, k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else
                  f"{prefix}.{k}" if prefix else k):
            if c in src.tensors and c not in skip:
                state[k] = src.load(c)
                break
    for names in groups.values():
        have = next((n for n in names if n in state), None)
        for n in names:
            if have is not None and n not in state:
                state[n] = state[have]
    return {"modules": modules}, state
