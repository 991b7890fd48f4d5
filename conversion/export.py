"""Writing checkpoints: safetensors shards streamed as layers finish, an index, the remote-code files, and an output
folder that appears only when complete (everything is written to a temporary sibling, then renamed)."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

import hf_mla


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


class ShardWriter:
    """Writes each tensor's bytes to disk as soon as it is added, and assembles a safetensors shard (header, then the
    data) whenever the shard passes `max_shard_bytes`: memory holds one tensor, never a shard. (Buffering a shard and
    calling safetensors' save_file held the whole output of a small model, twice at the flush.) Within a shard the
    data is laid out by element size, largest first, so every tensor's offset is a multiple of its element size, as
    save_file's layout guarantees: readers may view the mapped bytes without copying."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.shard_of: dict[str, int] = {}  # name -> index of the written shard that holds it
        self.n_shards = 0
        self.total_bytes = 0
        self._open()

    def _open(self) -> None:
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> (dtype, shape, element size, bytes)
        self.parts: dict[int, object] = {}  # element size -> file of that size's tensor bytes, in order
        self.shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: safetensors has no dtype {tensor.dtype}.")
        if name in self.entries or name in self.shard_of:
            raise ValueError(f"{name} is written twice.")
        nbytes = tensor.numel() * tensor.element_size()
        if self.entries and self.shard_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        size = tensor.element_size()
        if size not in self.parts:
            self.parts[size] = open(self.folder / f"shard-{self.n_shards:05d}.part{size}", "w+b")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # (nbytes,)
        self.parts[size].write(data.numpy().data)
        self.entries[name] = (_DTYPES[tensor.dtype], list(tensor.shape), size, nbytes)
        self.shard_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Write the shard: an 8-byte header length, the JSON header (space-padded to 8 bytes), then the parts."""
        if not self.entries:
            return
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for size in sorted(self.parts, reverse=True):
            for name, (dtype, shape, s, nbytes) in self.entries.items():
                if s == size:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path = self.folder / f"shard-{self.n_shards:05d}.tmp"
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for size in sorted(self.parts, reverse=True):
                part = self.parts[size]
                part.seek(0)
                shutil.copyfileobj(part, f, 1 << 24)
                part.close()
                os.remove(part.name)
        self.shard_of.update(dict.fromkeys(self.entries, self.n_shards))
        self.n_shards += 1
        self._open()

    def finish(self) -> Path:
        """Name the shards model-0000i-of-0000n.safetensors and write model.safetensors.index.json."""
        self.flush()
        n = self.n_shards
        finals = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(finals):
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
        weight_map = {name: finals[i] for name, i in sorted(self.shard_of.items())}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        path = self.folder / "model.safetensors.index.json"
        path.write_text(json.dumps(index, indent=2) + "\n")
        return path


def copy_remote_code(folder: Path, config) -> None:
    """Put the model's code beside the weights and name it in auto_map, so the checkpoint loads with
    trust_remote_code=True where hf_mla is not installed."""
    package = Path(hf_mla.__file__).parent
    for name in ("configuration_hf_mla.py", "modeling_hf_mla.py"):
        shutil.copy2(package / name, folder / name)
    config.auto_map = {
        "AutoConfig": "configuration_hf_mla.MlaConfig",
        "AutoModel": "modeling_hf_mla.MlaModel",
        "AutoModelForCausalLM": "modeling_hf_mla.MlaForCausalLM",
    }
    config.architectures = ["MlaForCausalLM"]


def model_type_of(folder: str | os.PathLike) -> str | None:
    """model_type in a folder's config.json, or None when the folder has no config.json."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}); fix or re-write the checkpoint.") from None


def require_hf_mla(folder: str | os.PathLike, fix: str) -> Path:
    """Refuse a folder that is not an hf_mla checkpoint, saying what it is and `fix`: what to do instead."""
    folder = Path(folder).expanduser()
    model_type = model_type_of(folder)
    if model_type is None:
        raise ValueError(f"{folder} has no config.json, so it is not an hf_mla checkpoint; {fix}")
    if model_type != "hf_mla":
        raise ValueError(f"{folder} holds a {model_type!r} model, not hf_mla; {fix}")
    return folder


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another output folder or pass --overwrite.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; remove it or choose another output path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `output_dir`; on success it replaces `output_dir`, on failure it is removed,
    so a failed run never leaves a half-written checkpoint (nor destroys the previous one)."""
    out = check_output_dir(output_dir, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
