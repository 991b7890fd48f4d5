"""Parity tests of the MLA model on tiny random configs (CPU, fp32)."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, tiny_mla_config, tiny_mla_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import hf_mla
from hf_mla.modeling_hf_mla import compute_mla_inv_freq


VARIANTS = {
    "shared-rope-key": {},
    "grouped-rope-keys+biases+q-lora": dict(
        num_rope_heads=2, latent_norm=False, q_lora_rank=16,
        q_proj_bias=True, kv_a_proj_bias=True, kv_b_proj_bias=True, o_proj_bias=True,
    ),
    "rope-head-per-query-head+yarn-subset": dict(
        num_rope_heads=4, rope_source_dim=16, softmax_scale=0.3,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32},
        rope_frequency_indices=[[[0, 5], [7, 1], [2, 3], [6, 4]], [[1, 2], [0, 7], [5, 3], [4, 6]]],  # per layer
    ),
}  # fmt: skip


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    """Relative to the scale of the expected tensor: logits of random models are O(1)."""
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale.item())


def with_path(model, path):
    model.config.attention_path = path
    return model


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def model(request):
    return tiny_mla_model(**VARIANTS[request.param])


def padded_batch(seed=1, vocab=97):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


@torch.no_grad()
def test_incremental_decode_equals_full_forward(model):
    ids, _ = padded_batch()
    ids = ids[:1]
    with_path(model, "materialized")
    full = model(ids).logits
    for path in ("auto", "absorbed", "materialized"):
        with_path(model, path)
        out = model(ids[:, :5], use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(5, ids.shape[1]):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        assert_close(torch.cat(steps, dim=1), full)


@torch.no_grad()
def test_chunked_prefill_over_cache_equals_full_forward(model):
    ids, _ = padded_batch()
    full = with_path(model, "materialized")(ids).logits
    for path in ("absorbed", "materialized"):
        with_path(model, path)
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :6], past_key_values=cache, use_cache=True).logits  # the older kwarg name
        second = model(ids[:, 6:], cache=cache, use_cache=True).logits
        assert_close(torch.cat([first, second], dim=1), full)


@torch.no_grad()
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_absorbed_equals_materialized_with_padding(attn_implementation):
    model = tiny_mla_model(attn_implementation=attn_implementation, **VARIANTS["grouped-rope-keys+biases+q-lora"])
    ids, mask = padded_batch()
    real = mask.bool()
    logits = {}
    for path in ("materialized", "absorbed"):
        with_path(model, path)
        prefill = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True)
        cache, steps = prefill.cache, [prefill.logits]
        for t in range(7, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        logits[path] = torch.cat(steps, dim=1)[real]
    assert_close(logits["absorbed"], logits["materialized"])


def test_auto_path_absorbs_decode_steps_only(monkeypatch):
    model = tiny_mla_model()
    calls = []
    attn_cls = type(model.model.layers[0].self_attn)
    for name in ("_absorbed", "_materialized"):
        original = getattr(attn_cls, name)
        monkeypatch.setattr(
            attn_cls, name, lambda self, *a, _o=original, _n=name, **k: (calls.append(_n), _o(self, *a, **k))[1]
        )
    ids, _ = padded_batch()
    with torch.no_grad():
        out = model(ids[:1, :6], use_cache=True)
        assert set(calls) == {"_materialized"}
        calls.clear()
        model(ids[:1, 6:7], cache=out.cache, use_cache=True)
    assert set(calls) == {"_absorbed"}
    model.train()
    calls.clear()
    model(ids[:1, :6]).logits.sum().backward()
    assert set(calls) == {"_materialized"}


@torch.no_grad()
def test_cache_holds_only_latent_and_rope_keys(model):
    ids, _ = padded_batch()
    cache = model(ids, use_cache=True).cache
    cfg = model.config
    assert len(cache.layers) == cfg.num_hidden_layers
    for layer in cache.layers:
        assert layer.keys.shape == (ids.shape[0], 1, ids.shape[1], cfg.kv_lora_rank)
        assert layer.values.shape == (ids.shape[0], 1, ids.shape[1], cfg.num_rope_heads * cfg.qk_rope_head_dim)
        per_token = (layer.keys.numel() + layer.values.numel()) // (ids.shape[0] * ids.shape[1])
        assert per_token == cfg.kv_cache_width == cfg.kv_lora_rank + cfg.num_rope_heads * cfg.qk_rope_head_dim


@torch.no_grad()
def test_cache_holds_latent_after_norm():
    model = tiny_mla_model(latent_norm=True)
    ids, _ = padded_batch()
    attn = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    expected = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(hidden)[..., : model.config.kv_lora_rank])
    cache = model(ids, use_cache=True).cache
    assert_close(cache.layers[0].keys[:, 0], expected)


@torch.no_grad()
def test_static_cache_equals_dynamic_cache(model):
    ids, mask = padded_batch()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for path in ("auto", "materialized"):
        with_path(model, path)
        dynamic = model.generate(ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True, **kwargs)
        static = model.generate(
            ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
            cache_implementation="static", **kwargs,
        )  # fmt: skip
        assert torch.equal(static.sequences, dynamic.sequences)
        assert_close(torch.stack(static.scores), torch.stack(dynamic.scores))


@torch.no_grad()
def test_generate_matches_manual_greedy_loop(model):
    ids, _ = padded_batch()
    ids = ids[:1, :5]
    generated = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    manual = ids
    for _ in range(8):
        nxt = model(manual).logits[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, nxt], dim=1)
    assert torch.equal(generated, manual)


@torch.no_grad()
def test_sampling_and_beam_search_run():
    model = tiny_mla_model(**VARIANTS["grouped-rope-keys+biases+q-lora"])
    ids, mask = padded_batch()
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    assert sampled.shape == (3, ids.shape[1] + 5)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 3
    # Beam search with the absorbed path reorders the latent cache: compare against materialized decoding.
    with_path(model, "materialized")
    beams_materialized = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0
    )
    assert torch.equal(beams, beams_materialized)


def test_save_reload_identical_logits(tmp_path, model):
    ids, mask = padded_batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_hf_mla.py").exists() and (tmp_path / "configuration_hf_mla.py").exists()
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, hf_mla.MlaConfig)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_hf_mla.MlaForCausalLM"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, hf_mla.MlaForCausalLM)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, hf_mla.MlaModel)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, torch

    class BlockHfMla(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_mla" or name.startswith("hf_mla."):
                raise ModuleNotFoundError(f"blocked: {name}")

    sys.meta_path.insert(0, BlockHfMla())
    from transformers import AutoModel, AutoModelForCausalLM

    path, ref = sys.argv[1], sys.argv[2]
    ids, mask, expected = torch.load(ref)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert "hf_mla" not in sys.modules
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        generated = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(logits, expected), (logits - expected).abs().max()
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    print("REMOTE_OK", type(model).__name__, type(base).__name__, tuple(generated.shape))
    """
)


def test_remote_code_loads_without_the_package(tmp_path):
    model = tiny_mla_model(**VARIANTS["rope-head-per-query-head+yarn-subset"])
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "ckpt")
    torch.save((ids, mask, expected), tmp_path / "ref.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "remote.py"), str(tmp_path / "ckpt"), str(tmp_path / "ref.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK MlaForCausalLM MlaModel (1, 14)" in result.stdout
    assert str(REPO) not in result.stdout


def test_lora_merge_equals_unmerged():
    peft = pytest.importorskip("peft")
    model = tiny_mla_model(**VARIANTS["grouped-rope-keys+biases+q-lora"])
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        unmerged = {}
        for path in ("materialized", "absorbed"):
            with_path(model, path)
            unmerged[path] = peft_model(ids, attention_mask=mask).logits[mask.bool()]
        assert_close(unmerged["absorbed"], unmerged["materialized"])
        merged = peft_model.merge_and_unload()
        for path in ("materialized", "absorbed"):
            with_path(merged, path)
            assert_close(merged(ids, attention_mask=mask).logits[mask.bool()], unmerged["materialized"])


@pytest.mark.parametrize("path", ["materialized", "absorbed"])
def test_gradients_flow_through_both_paths(path):
    model = tiny_mla_model(**VARIANTS["grouped-rope-keys+biases+q-lora"]).train()
    with_path(model, path)
    ids, mask = padded_batch()
    loss = model(ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "self_attn" in name:
            assert p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_matches_plain_backward():
    ids, mask = padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_mla_model().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(model.model.layers[0].self_attn.kv_b_proj.weight.grad.clone())
    assert_close(grads[1], grads[0])


@torch.no_grad()
def test_output_attentions_match_between_paths():
    model = tiny_mla_model(attn_implementation="eager")
    ids, _ = padded_batch()
    attentions = {}
    for path in ("materialized", "absorbed"):
        with_path(model, path)
        attentions[path] = model(ids, output_attentions=True).attentions
    for a, m in zip(attentions["absorbed"], attentions["materialized"]):
        assert_close(a, m)


@torch.no_grad()
def test_dtype_loading(tmp_path):
    model = tiny_mla_model()
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert bf16.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    ids, _ = padded_batch()
    out = bf16.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3)


def test_rope_frequencies_follow_source_schedule():
    """The kept pairs rotate by exactly the frequencies the source model uses, for every scaling type."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    schedules = [
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ]  # fmt: skip
    for params in schedules:
        llama = LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256, rope_parameters=params)
        reference = LlamaRotaryEmbedding(llama)
        keep = [[15, 0, 7, 12], [1, 2, 3, 4]]
        mla = tiny_mla_config(
            num_attention_heads=4, num_rope_heads=2, qk_rope_head_dim=8, rope_source_dim=32,
            max_position_embeddings=256, rope_parameters=params, rope_frequency_indices=keep,
        )  # fmt: skip
        inv_freq, factor = compute_mla_inv_freq(mla)
        assert torch.equal(inv_freq, reference.inv_freq[torch.tensor(keep)])
        assert factor == pytest.approx(reference.attention_scaling)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(num_rope_heads=3), "divisible by num_rope_heads"),
        (dict(qk_rope_head_dim=5), "even"),
        (dict(attention_path="fast"), "attention_path"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(rope_frequency_indices=[[0, 9]]), "rope_frequency_indices"),
        (dict(rope_frequency_indices=[[0]]), "rope_frequency_indices"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
    ],
)
def test_bad_config_raises_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_mla_config(**bad)


def test_absorbed_path_refuses_kernels_it_cannot_mask():
    model = with_path(tiny_mla_model(), "absorbed")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="eager' or 'sdpa'"):
        model(torch.tensor([[5, 6, 7]]))


@torch.no_grad()
def test_torch_compile_fullgraph_with_static_cache():
    """As the stock models: the forward compiles without graph breaks and decodes like eager (absorbed path)."""
    model = tiny_mla_model(**VARIANTS["grouped-rope-keys+biases+q-lora"])
    ids, mask = padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True, cache_implementation="static")  # fmt: skip
    eager = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    compiled = model.generate(ids, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert_close(torch.stack(compiled.scores), torch.stack(eager.scores))
