"""eval, sweep, the model card and push: figures equal hand computations, the card parses back, push is checked at
the HfApi boundary with a fake in place of the network."""

import json
import math

import pytest
import torch
from conftest import tiny_mla_model
from huggingface_hub import ModelCard
from test_convert import TEXT, save_source

import huggingface_hub
from conversion import convert
from conversion.cli import main as cli_main
from conversion.evaluate import decode_speed, evaluate, format_evaluation, kv_cache_bytes_per_token, perplexity
from conversion.hub import PushError, push


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Llama source and its conversion at 1/2 of the KV cache, with a card naming a base model."""
    root = tmp_path_factory.mktemp("eval")
    save_source(root / "src")
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1].replace("eht", "the"))
    convert(root / "src", root / "mla", kv_budget=0.5, calibration=[str(root / "calib.txt")], calibration_seq_len=32,
            calibration_tokens=512, fit_steps=2, base_model="someone/tiny-llama", progress=False)  # fmt: skip
    return root


def _hand_perplexity(model, stream, context, stride):
    """Each token scored once, by the first window that holds it with some context before it. Overlapping windows
    score every token but the first; disjoint ones (stride == context) also skip each window's first token."""
    nll, n, scored = 0.0, 0, set()
    starts = range(0, len(stream) - 1, stride)
    for s in starts:
        window = stream[s : s + context]
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
        for k in range(1, len(window)):
            t = s + k
            if t not in scored:
                scored.add(t)
                nll -= logp[k - 1, window[k]].item()
                n += 1
        if s + context >= len(stream):
            break
    unscored = set(range(stride, len(stream), stride)) if stride >= context else set()
    assert scored == set(range(1, len(stream))) - unscored
    return math.exp(nll / n)


@pytest.mark.parametrize("context, stride", [(8, None), (8, 4), (8, 3), (32, None)])
def test_perplexity_equals_hand_computation(context, stride):
    model = tiny_mla_model()
    stream = torch.randint(3, 97, (21,), generator=torch.Generator().manual_seed(0))
    expected = _hand_perplexity(model, stream, context, stride or context)
    assert perplexity(model, stream, context=context, stride=stride) == pytest.approx(expected, rel=1e-5)


def test_kv_bytes_are_the_cache_tensors_sizes():
    model = tiny_mla_model()
    c = model.config
    width = c.kv_lora_rank + c.num_rope_heads * c.qk_rope_head_dim
    ids = torch.randint(3, 97, (2, 10))
    assert kv_cache_bytes_per_token(model, ids) == c.num_hidden_layers * width * 4
    row = decode_speed(model, context=16, batch=3, steps=2, warmup=1)
    assert row["kv_cache_bytes"] == c.num_hidden_layers * width * 4 * 3 * 16  # measured after the prefill
    assert row["tokens_per_s"] > 0 and row["peak_memory_mb"] > 0


def test_evaluate_against_baseline_and_card(converted):
    result = evaluate(converted / "mla", baseline=converted / "src", text=[converted / "eval.txt"], max_tokens=256,
                      context=32, speed=[(16, 2)], decode_steps=2, max_new_tokens=3, progress=False)  # fmt: skip
    assert result["ratio"]["kv_bytes_per_token"] == pytest.approx(0.5)
    assert result["ratio"]["perplexity"] == pytest.approx(result["model"]["perplexity"] / result["baseline"]["perplexity"])
    row = result["speed"][0]
    assert row["kv_ratio"] == pytest.approx(0.5) and row["speedup"] > 0
    assert "sample" in result["model"] and "perplexity" in format_evaluation(result)

    card = ModelCard.load(converted / "mla" / "README.md")
    assert card.data.base_model == "someone/tiny-llama" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation" and {"mla", "kv-cache-compression", "hf-mla"} <= set(card.data.tags)
    assert "Not evaluated yet" in card.text and "trust_remote_code=True" in card.text

    from conversion.evaluate import save_evaluation

    save_evaluation(converted / "mla", result)
    card = ModelCard.load(converted / "mla" / "README.md")
    assert f"{result['model']['perplexity']:.3f}" in card.text and "Not evaluated yet" not in card.text


def test_different_tokenizers_are_refused(converted, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted / "src")
    tok.add_tokens(["extra"])
    save_source(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different tokenizers"):
        evaluate(converted / "mla", baseline=tmp_path / "other", text=[converted / "eval.txt"], speed=None)


class FakeApi:
    """HfApi's surface that push uses, recording each call; `existing` is the model_type of a repo that exists."""

    def __init__(self, existing=None, exists=False):
        self.calls, self.existing, self.exists = [], existing, exists

    def repo_exists(self, repo_id):
        self.calls.append(("repo_exists", repo_id))
        return self.exists

    def hf_hub_download(self, repo_id, filename, revision=None):
        self.calls.append(("hf_hub_download", repo_id, filename))
        path = self.tmp / "remote_config.json"
        path.write_text(json.dumps({"model_type": self.existing}))
        return str(path)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://hf.co/{kwargs['repo_id']}/commit/1", "pr_url": None})()


TOKEN = "hf_secretTOKEN123"


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)


def test_push_creates_repo_and_uploads_the_folder(converted, token, tmp_path):
    api = FakeApi()
    api.tmp = tmp_path
    result = push(converted / "mla", "me/tiny-mla", private=True, revision="v1", api=api)
    names = [c[0] for c in api.calls]
    assert names == ["repo_exists", "create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][2]["private"] is True
    upload = api.calls[3][1]
    assert upload["repo_id"] == "me/tiny-mla" and upload["revision"] == "v1" and upload["create_pr"] is False
    assert upload["folder_path"] == str(converted / "mla")
    assert result["url"].startswith("https://hf.co/me/tiny-mla")
    assert 'from_pretrained("me/tiny-mla"' in (converted / "mla" / "README.md").read_text()
    for f in (converted / "mla").iterdir():  # the token is never written anywhere
        assert TOKEN not in f.read_bytes().decode("utf-8", "replace")


def test_push_refuses_before_uploading(converted, token, tmp_path, monkeypatch):
    api = FakeApi(existing="llama", exists=True)
    api.tmp = tmp_path
    with pytest.raises(PushError, match="type 'llama'"):
        push(converted / "mla", "me/tiny-mla", api=api)
    assert "upload_folder" not in [c[0] for c in api.calls]

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for f in (converted / "mla").iterdir():
        if f.name != "modeling_hf_mla.py" and not f.name.startswith("tokenizer"):
            (incomplete / f.name).write_bytes(f.read_bytes())
    with pytest.raises(PushError, match="modeling_hf_mla.py is missing.*no tokenizer"):
        push(incomplete, "me/x", api=FakeApi())

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    api = FakeApi()
    with pytest.raises(PushError, match="HF_TOKEN"):
        push(converted / "mla", "me/tiny-mla", api=api)
    assert api.calls == []


def test_push_dry_run_lists_the_real_folder(converted, capsys):
    before = {f.name: f.stat().st_mtime for f in (converted / "mla").iterdir()}
    assert cli_main(["push", str(converted / "mla"), "me/tiny-mla", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("config.json", "modeling_hf_mla.py", "model.safetensors.index.json", "README.md", "tokenizer.json"):
        assert name in out
    assert "nothing uploaded" in out
    assert before == {f.name: f.stat().st_mtime for f in (converted / "mla").iterdir()}
    assert cli_main(["push", str(converted / "src"), "me/x", "--dry-run"]) == 2
    assert "model_type 'llama'" in capsys.readouterr().err


def test_sweep_writes_table_plot_and_one_checkpoint_per_budget(converted, tmp_path, capsys):
    args = ["sweep", str(converted / "src"), "--budgets", "0.5,0.25", "--text", str(converted / "eval.txt"),
            "--calibration", str(converted / "calib.txt"), "--out", str(tmp_path / "sweep"), "--eval-tokens", "256",
            "--context", "32", "--calibration-tokens", "512", "--calibration-seq-len", "32", "--speed-contexts", "8,16", "--decode-steps", "2", "--fit-steps", "0"]  # fmt: skip
    assert cli_main(args) == 0
    out = tmp_path / "sweep"
    result = json.loads((out / "sweep.json").read_text())
    assert [r["budget"] for r in result["budgets"]] == [0.5, 0.25]
    assert [r["kv_bytes_per_token"] for r in result["budgets"]] == pytest.approx(
        [result["source_model"]["kv_bytes_per_token"] * b for b in (0.5, 0.25)]
    )
    assert (out / "sweep.png").stat().st_size > 1000 and "| source |" in (out / "sweep.md").read_text()
    for b in ("0.5", "0.25"):
        assert (out / f"budget-{b}" / "evaluation.json").is_file()
        assert (out / f"budget-{b}" / "conversion_report.json").is_file()
