import os
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# A word-level vocabulary: enough for tokenizer-dependent code paths, built offline.
WORDS = "<unk> <s> </s> the a of and to in is was it that he she said".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_mla_config(**overrides):
    import hf_mla

    kwargs = dict(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        kv_lora_rank=12,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        num_rope_heads=1,
        latent_norm=True,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return hf_mla.MlaConfig(**kwargs)


def tiny_mla_model(seed=0, attn_implementation="sdpa", **overrides):
    import hf_mla

    torch.manual_seed(seed)
    config = tiny_mla_config(**overrides)
    model = hf_mla.MlaForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    # Norm weights start at 1 and biases at 0; perturb them so that tests see every parameter at work.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
