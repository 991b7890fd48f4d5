import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conversion.data import corpus_rows, load_texts, pack_tokens, sample_texts_from_model, spread_tokens

WORDS = "<unk> <s> </s> the a of and to in is was it that he she said".split()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_txt_and_md(tmp_path):
    (tmp_path / "a.txt").write_text("the a of\nand to")
    (tmp_path / "b.md").write_text("# he said")
    assert load_texts(tmp_path / "a.txt") == ["the a of\nand to"]
    assert load_texts([str(tmp_path / "a.txt"), tmp_path / "b.md"]) == ["the a of\nand to", "# he said"]


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "the a"}) + "\n\n" + json.dumps({"text": "of and", "id": 2}) + "\n")
    assert load_texts(f) == ["the a", "of and"]
    g = tmp_path / "e.jsonl"
    g.write_text(json.dumps({"body": "x"}) + "\n")
    assert load_texts(g, text_field="body") == ["x"]
    with pytest.raises(ValueError, match=r"e.jsonl:1 has no string field 'text' \(it has: body\).*text_field"):
        load_texts(g)
    g.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match="e.jsonl:2 is not valid JSON"):
        load_texts(g)
    h = tmp_path / "f.json"
    h.write_text(json.dumps([{"text": "p"}, {"text": "q"}]))
    assert load_texts(h) == ["p", "q"]


def test_directory_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n")
    (tmp_path / "c.bin").write_bytes(b"\0\1")
    (tmp_path / "empty.txt").write_text("  \n")
    assert load_texts(tmp_path) == ["first", "second"]
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):
        load_texts(tmp_path / "sub")


def test_missing_path_and_not_a_dataset(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="does not exist"):
        load_texts("./no/such/dir")
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="'someone/corpus:cfg' is not an existing file or folder.*ConnectionError"):
        load_texts("someone/corpus:cfg")


def test_dataset_streaming(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "the a"}, {"text": ""}, {"text": "of"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_texts("wikitext:wikitext-2-raw-v1", split="test") == ["the a", "of"]
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test", True)]
    with pytest.raises(ValueError, match="no field 'body'"):
        load_texts("wikitext", text_field="body")


def test_empty_and_max_chars(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="no text"):
        load_texts(tmp_path / "e.txt")
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text("abcd")
    assert len(load_texts(tmp_path, max_chars=8)) == 2


def test_pack_tokens_shapes_and_bos(tok):
    texts = ["the a of and to"] * 4  # 5 tokens each, + 3 EOS = 23 tokens
    ids = pack_tokens(tok, texts, seq_len=8)
    assert ids.dtype == torch.long and ids.shape == (3, 8)  # 23 // 7 rows of BOS + 7
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, 1:] != tok.bos_token_id).all()
    assert ids[0].tolist() == [1, 3, 4, 5, 6, 7, 2, 3]  # EOS joins documents
    assert ids[1, 1:].tolist() == [4, 5, 6, 7, 2, 3, 4]  # continues where the previous row stopped
    no_bos = pack_tokens(tok, texts, seq_len=8, add_bos=False)
    assert no_bos.shape == (2, 8) and no_bos[0].tolist() == [3, 4, 5, 6, 7, 2, 3, 4]


def test_pack_tokens_max_tokens(tok):
    texts = ["the a of and to in is was"] * 100
    assert pack_tokens(tok, texts, seq_len=10).shape == (99, 10)
    assert pack_tokens(tok, texts, seq_len=10, max_tokens=55).shape == (5, 10)
    with pytest.raises(ValueError, match="max_tokens=5"):
        pack_tokens(tok, texts, seq_len=10, max_tokens=5)


def test_pack_tokens_too_little_text(tok):
    with pytest.raises(ValueError, match="only 3 tokens.*seq_len=16 needs 15"):
        pack_tokens(tok, ["the a of"], seq_len=16)


def test_spread_tokens_rows_from_every_part(tok):
    # four documents, each one word repeated: a row's words say where in the corpus it came from
    texts = [" ".join([w] * 40) for w in ("the", "and", "was", "she")]  # equal lengths: two stretches each
    ids = spread_tokens(tok, texts, seq_len=6, rows=8)
    assert ids.shape == (8, 6) and (ids[:, 0] == tok.bos_token_id).all()
    # two rows per document, in corpus order, where pack_tokens would take all eight from the first document
    assert ids[:, 1].tolist() == [3, 3, 6, 6, 10, 10, 14, 14]
    assert (pack_tokens(tok, texts, seq_len=6, max_tokens=48)[:, 1] == 3).all()
    # a row that reaches a document's end reads on into the next one, EOS between them
    row = spread_tokens(tok, ["the a of", "and to in is was it"], seq_len=5, rows=2, add_bos=False)
    assert row[0].tolist() == [3, 4, 5, 2, 6] and row[1, 0].item() != 3


def test_spread_tokens_short_text_packs_from_start(tok):
    # 12 tokens for 2 rows of BOS + 6: the second half, started at a word boundary, holds fewer than 6
    texts = ["the a of and to in is was it that he she"]
    ids = spread_tokens(tok, texts, seq_len=7, rows=2)
    assert torch.equal(ids, pack_tokens(tok, texts, seq_len=7, max_tokens=14)) and ids[1, 1:].tolist() == [9, 10, 11, 12, 13, 14]
    with pytest.raises(ValueError, match="rows=0"):
        spread_tokens(tok, texts, seq_len=7, rows=0)


def test_corpus_rows_reads_a_bounded_slice(tok, tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.txt").write_text(" ".join(["the a of"] * 2000))
    ids = corpus_rows(tok, tmp_path, seq_len=4, rows=2)  # reads 400 * 8 characters: the first of five 12k files
    assert ids.shape == (2, 4)
    assert torch.equal(ids, spread_tokens(tok, load_texts(tmp_path / "0.txt"), seq_len=4, rows=2))


@pytest.mark.skipif(not (SHARED / "austen").is_dir(), reason="shared/data/austen not present")
def test_pack_real_text_fast():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = load_texts(SHARED / "austen")
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    t.train_from_iterator([texts[0][:200_000]], trainer)
    tk = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = pack_tokens(tk, texts, seq_len=512, max_tokens=500_000)
    assert ids.shape == (500_000 // 512, 512) and (ids[:, 0] == 1).all()


@pytest.fixture
def one_thread():
    """Tiny matmuls are fastest, and immune to busy CPUs, on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sample_texts_from_model(tok, one_thread):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.top_k = 1  # must not leak in: sampling is pure
    state = torch.random.get_rng_state()
    a = sample_texts_from_model(model, tok, n_sequences=3, seq_len=10, seed=3, batch_size=2)
    b = sample_texts_from_model(model, tok, n_sequences=3, seq_len=10, seed=3, batch_size=2)
    assert a.shape == (3, 10) and a.dtype == torch.long and torch.equal(a, b)
    assert (a[:, 0] == tok.bos_token_id).all() and (a[:, 1:] != tok.eos_token_id).all()
    assert len({tuple(r) for r in a.tolist()}) > 1  # sampled, not greedy
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
