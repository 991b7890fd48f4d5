"""The streaming shard writer: what it writes reads back bit for bit with safetensors, in shards no larger than asked,
with every tensor aligned to its element size, and with nothing temporary left behind."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from conversion.export import ShardWriter


def test_shard_writer_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "i64": torch.arange(7), "bf16": torch.randn(5, generator=g).bfloat16(),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "big": torch.randn(100, 3, generator=g),
        "mask": torch.tensor([True, False, True]), "f16": torch.randn(3, generator=g).half(),
        "strided": torch.randn(6, 4, generator=g).T, "f64": torch.randn(2, generator=g).double(),
    }  # fmt: skip
    writer = ShardWriter(tmp_path, 1000)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and sorted(p.name for p in tmp_path.iterdir()) == [*shards, "model.safetensors.index.json"]
    for shard in shards:
        raw = (tmp_path / shard).read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        assert (8 + n) % 8 == 0
        sizes = [t.numel() * t.element_size() for k, t in tensors.items() if index["weight_map"][k] == shard]
        assert sum(sizes) <= 1000 or len(sizes) == 1  # one tensor over the limit gets a shard of its own
        for name, meta in header.items():
            if name != "__metadata__":
                assert meta["data_offsets"][0] % tensors[name].element_size() == 0
        loaded = load_file(tmp_path / shard)
        for name, t in loaded.items():
            assert index["weight_map"][name] == shard
            assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name])
    assert set(index["weight_map"]) == set(tensors)


def test_shard_writer_refuses_a_name_twice(tmp_path):
    writer = ShardWriter(tmp_path, 10)
    writer.add("a", torch.zeros(4))
    writer.add("b", torch.zeros(4))  # starts a second shard
    with pytest.raises(ValueError, match="a is written twice"):
        writer.add("a", torch.zeros(1))
