"""Conversion correctness on tiny random Llama / Mistral / Qwen2 checkpoints (MHA and GQA), CPU fp32."""

import json
import sys

import pytest
import torch
from conftest import WORDS, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

import hf_mla
from conversion import SourceError, convert
from conversion.cli import main as cli_main


ARCHS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
# Random word sequences: calibration text from the same distribution as the random test inputs.
TEXT = " ".join(WORDS[i] for i in torch.randint(3, len(WORDS), (3000,), generator=torch.Generator().manual_seed(0)))


def save_source(path, arch="llama", seed=0, **overrides):
    kwargs = dict(
        vocab_size=len(WORDS), hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHS[arch](**kwargs)).eval()
    with torch.no_grad():  # random biases and norms, so that their conversion is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


@pytest.fixture
def ids():
    return torch.randint(3, len(WORDS), (2, 24), generator=torch.Generator().manual_seed(1))


def logits(path_or_model, ids):
    model = path_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(path_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def full_rank(K=2, D=16, rope_dim=16, shared=False):
    return dict(kv_lora_rank=K * ((D if shared else D - rope_dim) + D), rope_dim=rope_dim)


EXACT_CASES = {
    "llama-gqa": dict(arch="llama"),
    "llama-mha": dict(arch="llama", num_key_value_heads=4),
    "mistral-gqa": dict(arch="mistral"),
    "qwen2-gqa-biases": dict(arch="qwen2"),
    "llama-llama3-rope": dict(arch="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama-yarn-rope": dict(arch="llama", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear-rope-tied": dict(arch="llama", tie_word_embeddings=True,
                                   rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(EXACT_CASES))
@pytest.mark.parametrize("factorization", ["weight", "activation"])
def test_full_rope_full_rank_reproduces_source(tmp_path, ids, case, factorization):
    kw = dict(EXACT_CASES[case])
    source = save_source(tmp_path / "src", **kw)
    K = source.config.num_key_value_heads
    report = convert(
        tmp_path / "src", tmp_path / "out", rope_heads="per-kv-head", rope_selection="high",
        factorization=factorization, calibration=[_text(tmp_path)], calibration_seq_len=32, calibration_tokens=512,
        progress=False, **full_rank(K=K),
    )  # fmt: skip
    assert report["budget"]["kv_budget_reached"] == 1.0
    assert_close(logits(tmp_path / "out", ids), logits(source, ids))


def _text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def partial_rope_reference(source, keep):
    """The source with RoPE switched off on the pairs not kept: what MLA with per-KV-head keys computes at full rank."""
    rotary = source.model.rotary_emb
    mask = torch.zeros_like(rotary.inv_freq, dtype=torch.bool)
    mask[keep] = True
    rotary.inv_freq[~mask] = 0.0
    return source


@pytest.mark.parametrize(
    "arch, factorization",
    [
        ("llama", "activation"),
        ("llama", "weight"),
        ("qwen2", "weight"),
        pytest.param("qwen2", "activation", marks=pytest.mark.xfail(strict=True, reason=(
            "known issue: with large random q/k biases the activation metric's error is not monotone in the rank "
            "(exact at full rank); see the issue notes"))),
    ],
)  # fmt: skip
def test_factorization_at_full_rank_reproduces_partial_rope_model(tmp_path, ids, arch, factorization):
    source = save_source(tmp_path / "src", arch=arch)
    calib = _text(tmp_path)
    report = convert(
        tmp_path / "src", tmp_path / "out", rope_heads="per-kv-head", rope_selection="high", calibration=[calib],
        factorization=factorization, calibration_seq_len=32, calibration_tokens=512, progress=False, fit_steps=0,
        **full_rank(rope_dim=6),
    )  # fmt: skip
    assert all(r["rope_pairs"] == [[0, 1, 2]] * 2 for r in report["layers"])
    reference = logits(partial_rope_reference(source, [0, 1, 2]), ids)
    assert_close(logits(tmp_path / "out", ids), reference)

    errors, retained = [], []
    for rank in (4, 12, 24, 40):  # on the statistics as measured (no shrinkage): the metric the factorization is exact in
        report = convert(
            tmp_path / "src", tmp_path / f"r{rank}", kv_lora_rank=rank, rope_dim=6, rope_heads="per-kv-head",
            rope_selection="high", factorization=factorization, calibration=[calib], calibration_seq_len=32,
            calibration_tokens=2048, progress=False, fit_steps=0, covariance_shrinkage=0.0,
        )  # fmt: skip
        retained.append(report["mean_retained_energy"])
        errors.append((logits(tmp_path / f"r{rank}", ids) - reference).pow(2).mean().item())
    assert retained == sorted(retained) and retained[0] < retained[-1], retained
    assert errors == sorted(errors, reverse=True) and errors[0] > 10 * errors[-1] > 0, errors


def test_per_layer_fit_lowers_each_layers_attention_error(tmp_path):
    source = save_source(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out", kv_budget=0.25, calibration=[_text(tmp_path)],
                     calibration_seq_len=32, calibration_tokens=512, fit_steps=60, fit_sequences=16, fit_seq_len=32,
                     progress=False)  # fmt: skip
    for layer in report["layers"]:
        assert layer["fit_error_after"] < 0.8 * layer["fit_error_before"], layer
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for mla, src in zip(converted.model.layers, source.model.layers):  # the fit trains the rest, o_proj stays
        assert torch.equal(mla.self_attn.o_proj.weight, src.self_attn.o_proj.weight)


def test_stream_fit_targets_the_source_models_own_stream(tmp_path):
    """fit_target="stream": layer 0 sees the source's own inputs, so its fit is the local one; from layer 1 on the
    target also undoes the drift of the layers before, so the errors differ."""
    save_source(tmp_path / "src", num_hidden_layers=3)
    common = dict(kv_budget=0.25, calibration=[_text(tmp_path)], calibration_seq_len=32, calibration_tokens=512,
                  fit_steps=5, fit_seq_len=32, progress=False)  # fmt: skip
    local = convert(tmp_path / "src", tmp_path / "local", fit_target="local", **common)["layers"]
    stream = convert(tmp_path / "src", tmp_path / "stream", fit_target="stream", **common)["layers"]
    assert local[0]["fit_error_before"] == stream[0]["fit_error_before"]
    assert local[0]["fit_error_after"] == stream[0]["fit_error_after"]
    assert local[2]["fit_error_before"] != stream[2]["fit_error_before"]
    with pytest.raises(ValueError, match="fit_target"):
        convert(tmp_path / "src", tmp_path / "bad", fit_target="global", **common)


def test_shared_rope_key_is_exact_for_a_single_kv_head(tmp_path, ids):
    """With one KV head the per-pair PCA has nothing to drop: a shared key with every pair is the source."""
    source = save_source(tmp_path / "src", num_key_value_heads=1)
    convert(tmp_path / "src", tmp_path / "out", kv_lora_rank=32, rope_dim=16, rope_heads="shared",
            rope_selection="rotation", calibration=[_text(tmp_path)], calibration_seq_len=32, calibration_tokens=512,
            progress=False)  # fmt: skip
    assert_close(logits(tmp_path / "out", ids), logits(source, ids))


def test_default_conversion_writes_a_complete_checkpoint(tmp_path, ids):
    save_source(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out", kv_budget=0.25, calibration=[_text(tmp_path)],
                     calibration_seq_len=32, calibration_tokens=512, progress=False)  # fmt: skip
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors.index.json", "modeling_hf_mla.py", "configuration_hf_mla.py",
                 "tokenizer.json", "generation_config.json", "conversion_report.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert json.loads((out / "conversion_report.json").read_text())["budget"] == report["budget"]
    assert report["budget"]["kv_budget_reached"] == 0.25
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_mla" and config["auto_map"]["AutoModelForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, hf_mla.MlaForCausalLM)
    assert model.config.kv_cache_width == 16  # 0.25 * 2 * 2 KV heads * 16
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_calibration_falls_back_to_model_samples(tmp_path):
    save_source(tmp_path / "src")
    report = convert(tmp_path / "src", tmp_path / "out", kv_budget=0.5, calibration=None, calibration_seq_len=16,
                     calibration_tokens=64, progress=False)  # fmt: skip
    assert report["calibration"]["source"] == "sampled from the source model"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_budget=0.01), "no room for the latent"),
        (dict(kv_lora_rank=100, rope_dim=8), "saves nothing"),
        (dict(kv_budget=1.5), r"\(0, 1\)"),
        (dict(kv_lora_rank=8), "--rope-dim"),
        (dict(kv_budget=0.25, rope_dim=7), "even"),
        (dict(kv_budget=0.25, rope_selection="best"), "rope_selection"),
        (dict(kv_budget=0.25, fit_precision="fp8"), "fit_precision"),
        (dict(kv_budget=0.25, key_weight=0), "key_weight"),
        (dict(kv_budget=0.25, key_weight="best"), "key_weight"),
        (dict(kv_budget=0.25, calibration=["/nonexistent/calib.txt"]), "does not exist"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, kwargs, message):
    save_source(tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        convert(tmp_path / "src", tmp_path / "out", progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unsupported_architecture(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SourceError, match="LlamaForCausalLM"):
        convert(tmp_path / "gpt2", tmp_path / "out", kv_budget=0.25, progress=False)


def test_truncated_source_fails_cleanly(tmp_path):
    save_source(tmp_path / "src")
    weights = tmp_path / "src" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(SourceError, match="truncated"):
        convert(tmp_path / "src", tmp_path / "out", kv_budget=0.25, progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_survives_a_failed_run(tmp_path, monkeypatch):
    save_source(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous run")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(tmp_path / "src", tmp_path / "out", kv_budget=0.25, progress=False)

    convert_module = sys.modules["conversion.convert"]  # the package's `convert` attribute is the function

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_module, "copy_remote_code", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(tmp_path / "src", tmp_path / "out", kv_budget=0.25, factorization="weight", rope_selection="high",
                overwrite=True, progress=False)  # fmt: skip
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_cli_convert_and_clear_errors(tmp_path, capsys):
    save_source(tmp_path / "src")
    calib = _text(tmp_path)
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--kv-budget", "0.5", "--calibration", calib,
            "--calibration-tokens", "512", "--calibration-seq-len", "32"]  # fmt: skip
    assert cli_main(args) == 0
    assert "0.5000 of the source's" in capsys.readouterr().out
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "o2"), "--kv-budget", "0.5"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "out"), "--baseline", str(tmp_path / "src"), "--text", calib,
                     "--max-tokens", "256", "--context", "32", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["ratio"]["kv_bytes_per_token"] == pytest.approx(0.5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_received_matches_the_source_models_attention_probabilities(tmp_path, arch):
    """The tokens' received attention equals what transformers' eager Llama / Qwen2 attention computes (layer 1, so
    that the input is a real hidden state; Qwen2 for the q/k biases), and the query blocks tile the rows exactly."""
    from conversion.calibrate import attention_received
    from conversion.convert import _layer_names

    model = save_source(tmp_path / "src", arch=arch, num_hidden_layers=2, attn_implementation="eager")
    ids = torch.randint(3, len(WORDS), (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    expected = out.attentions[1].sum(-2).mean(1)  # (B, T): sum over queries, mean over heads
    sd = model.state_dict()
    w = {k: sd[v] for k, v in _layer_names(1).items() if v in sd}
    c = model.config
    inv_freq = model.model.rotary_emb.inv_freq
    got = attention_received(out.hidden_states[1], sd["model.layers.1.input_layernorm.weight"], c.rms_norm_eps, w,
                             n_heads=4, n_kv_heads=2, head_dim=16, inv_freq=inv_freq, block=7)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sum(-1), torch.full((3,), 20.0))


def test_weighted_input_covariance_is_the_weighted_mean_and_sinks_change_the_conversion(tmp_path):
    from conversion.calibrate import input_covariance, rms_norm

    g = torch.Generator().manual_seed(3)
    h, ln, wt = torch.randn(3, 5, 8, generator=g), torch.rand(8, generator=g) + 0.5, torch.rand(3, 5, generator=g)
    x = torch.cat([rms_norm(h, ln, 1e-6), torch.ones(3, 5, 1)], -1).reshape(15, 9).double()
    expected = sum(wt.reshape(-1)[i].double() * torch.outer(x[i], x[i]) for i in range(15)) / wt.double().sum()
    torch.testing.assert_close(input_covariance(h, ln, 1e-6, token_weight=wt), expected)
    torch.testing.assert_close(input_covariance(h, ln, 1e-6, token_weight=torch.ones(3, 5)), input_covariance(h, ln, 1e-6))

    save_source(tmp_path / "src")
    common = dict(kv_budget=0.25, calibration=[_text(tmp_path)], calibration_seq_len=32, calibration_tokens=512,
                  fit_steps=0, progress=False)  # fmt: skip
    plain = convert(tmp_path / "src", tmp_path / "plain", attention_weighting=0.0, **common)
    weighted = convert(tmp_path / "src", tmp_path / "weighted", **common)
    assert weighted["settings"]["attention_weighting"] == 1.0 and plain["settings"]["attention_weighting"] == 0.0
    assert plain["layers"][0]["retained_energy"] != weighted["layers"][0]["retained_energy"]
    with pytest.raises(ValueError, match="attention_weighting"):
        convert(tmp_path / "src", tmp_path / "bad", attention_weighting=1.5, **common)


def test_covariance_shrinkage_blends_toward_the_diagonal_and_changes_the_conversion(tmp_path):
    from conversion.calibrate import input_covariance

    g = torch.Generator().manual_seed(4)
    h, ln = torch.randn(2, 6, 8, generator=g), torch.rand(8, generator=g) + 0.5
    raw, shrunk = input_covariance(h, ln, 1e-6), input_covariance(h, ln, 1e-6, shrinkage=0.25)
    expected = raw.clone()
    expected[:8, :8] = 0.75 * raw[:8, :8] + 0.25 * torch.diag(raw[:8, :8].diagonal())
    torch.testing.assert_close(shrunk, expected)  # the bias row and column (E[x], 1) are left as they are

    save_source(tmp_path / "src")
    common = dict(kv_budget=0.25, calibration=[_text(tmp_path)], calibration_seq_len=32, calibration_tokens=512,
                  fit_steps=0, progress=False)  # fmt: skip
    plain = convert(tmp_path / "src", tmp_path / "plain", covariance_shrinkage=0.0, **common)
    shrunk = convert(tmp_path / "src", tmp_path / "shrunk", covariance_shrinkage=0.5, **common)
    assert plain["settings"]["covariance_shrinkage"] == 0.0 and shrunk["settings"]["covariance_shrinkage"] == 0.5
    assert plain["layers"][0]["retained_energy"] != shrunk["layers"][0]["retained_energy"]
    with pytest.raises(ValueError, match="covariance_shrinkage"):
        convert(tmp_path / "src", tmp_path / "bad", covariance_shrinkage=-0.1, **common)


def test_key_weight_auto_reports_one_candidate_per_layer_and_a_fixed_weight_is_kept(tmp_path):
    from conversion.convert import KEY_WEIGHTS

    save_source(tmp_path / "src")
    common = dict(kv_budget=0.25, calibration=[_text(tmp_path)], calibration_seq_len=32, calibration_tokens=512,
                  fit_steps=2, fit_sequences=2, fit_seq_len=32, progress=False)  # fmt: skip
    auto = convert(tmp_path / "src", tmp_path / "auto", **common)  # 2 fit rows: fewer than the choice reads
    assert all(layer["key_weight"] in KEY_WEIGHTS for layer in auto["layers"])
    assert list(auto["settings"]["key_weight"]) == list(KEY_WEIGHTS)  # the candidates
    fixed = convert(tmp_path / "src", tmp_path / "fixed", key_weight=2, **common)
    assert fixed["settings"]["key_weight"] == 2.0 and all("key_weight" not in layer for layer in fixed["layers"])
    args = ["convert", str(tmp_path / "src"), str(tmp_path / "cli"), "--kv-budget", "0.25", "--calibration",
            _text(tmp_path), "--calibration-tokens", "512", "--calibration-seq-len", "32", "--fit-steps", "0"]
    assert cli_main([*args, "--key-weight", "1,8"]) == 0
    report = json.loads((tmp_path / "cli" / "conversion_report.json").read_text())
    assert report["settings"]["key_weight"] == [1.0, 8.0] and {l["key_weight"] for l in report["layers"]} <= {1.0, 8.0}
    with pytest.raises(SystemExit):  # argparse: "'x' is neither 'auto' nor numbers such as 4 or 1,4,16"
        cli_main([*args, "--overwrite", "--key-weight", "x"])
