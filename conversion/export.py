"""Writing checkpoints: safetensors shards streamed as layers finish, an index, the remote-code files, and an output
folder that appears only when complete (everything is written to a temporary sibling, then renamed)."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

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


class ShardWriter:
    """Buffers tensors and writes a shard whenever the buffer passes `max_shard_bytes`, so that peak memory stays
    near one shard however large the model."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + nbytes > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.buffer:
            return
        save_file(self.buffer, str(self.folder / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> Path:
        """Name the shards model-0000i-of-0000n.safetensors and write model.safetensors.index.json."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
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
