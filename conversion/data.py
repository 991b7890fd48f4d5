"""Text for calibration, healing and evaluation: any local text a user names, a Hub dataset, or none at all.

Keep calibration and evaluation text apart: perplexity on text the model was calibrated on flatters it.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

logger = logging.get_logger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSON_SUFFIXES = (".jsonl", ".json")


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        first = f.read(1024).lstrip()[:1]
        f.seek(0)
        if first == "[":  # a JSON array of records rather than JSON lines
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); fix the file.") from None
            lines = enumerate(records, 1)
        else:
            lines = ((i, line) for i, line in enumerate(f, 1) if line.strip())
        for i, rec in lines:
            if isinstance(rec, str):
                try:
                    rec = json.loads(rec)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i} is not valid JSON ({e}); write one JSON object per line.") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                fields = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                raise ValueError(
                    f"{path}:{i} has no string field {text_field!r} (it has: {fields}); "
                    "pass text_field= (--text-field) naming the field that holds the text."
                )
            yield rec[text_field]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() in JSON_SUFFIXES:
        yield from _read_json(path, text_field)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _read_dataset(spec: str, text_field: str, split: str) -> Iterator[str]:
    """Stream a Hub dataset, so a huge corpus costs only the documents actually used."""
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
        records = iter(ds)
        first = next(records, None)
    except Exception as e:
        raise ValueError(
            f"{spec!r} is not an existing file or folder, and loading it as a Hugging Face dataset failed "
            f"({type(e).__name__}: {e}); pass a .txt/.jsonl file or a folder of them, or a dataset name "
            "such as 'Salesforce/wikitext:wikitext-2-raw-v1' (needs network and `pip install datasets`)."
        ) from e
    if first is None:
        return
    if text_field not in first:
        raise ValueError(
            f"dataset {spec!r} (split {split!r}) has no field {text_field!r} (it has: {', '.join(first)}); "
            "pass text_field= (--text-field) naming the field that holds the text."
        )
    for rec in itertools.chain([first], records):
        yield rec[text_field]


def _looks_like_path(s: str) -> bool:
    """Hub dataset names are "name" or "owner/name"; anything else is a path that does not exist."""
    suffix = Path(s).suffix.lower()
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s or suffix in TEXT_SUFFIXES + JSON_SUFFIXES


def _documents(source, text_field: str, split: str) -> Iterator[str]:
    path = Path(source).expanduser()
    if path.is_file():
        yield from _read_file(path, text_field)
    elif path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no .txt, .md or .jsonl files; point at a folder of text files.")
        for f in files:
            yield from _read_file(f, text_field)
    elif isinstance(source, str) and not _looks_like_path(source):
        yield from _read_dataset(source, text_field, split)
    else:
        raise ValueError(f"{source} does not exist; pass an existing .txt/.jsonl file or folder, or a Hub dataset.")


def load_texts(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    text_field: str = "text",
    split: str = "train",
    max_chars: int | None = None,
) -> list[str]:
    """Documents from text files (one document each), JSON lines, folders of them, or Hub datasets ("name:config").

    `max_chars` stops reading once that many characters are collected: a streamed Hub corpus can be endless.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    texts, chars = [], 0
    with tqdm(desc="Reading text", unit=" docs", disable=None) as bar:
        for source in sources:
            for doc in _documents(source, text_field, split):
                if not doc.strip():
                    continue
                texts.append(doc)
                chars += len(doc)
                bar.update()
                if max_chars is not None and chars >= max_chars:
                    return texts
    if not texts:
        raise ValueError(f"no text found in {', '.join(map(str, sources))}; pass files or a dataset that hold text.")
    return texts


@dataclass
class TokenizedText:
    """Token ids packed once (N, T) and where they came from, to be reused by several runs (the sweep's budgets)."""

    ids: torch.LongTensor
    source: list[str]


def _token_stream(tokenizer, texts: Iterable[str], batch_chars: int = 200_000) -> Iterator[list[int]]:
    """Token ids document by document, tokenizing batches of about `batch_chars` characters: batches give a fast
    tokenizer its parallelism on short documents, and the cap keeps a corpus of novels from being tokenized whole
    (time and hundreds of MB) when the caller stops after the first few thousand tokens."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= batch_chars:
            yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            batch, chars = [], 0
    if batch:
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def pack_tokens(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    max_tokens: int | None = None,
    add_bos: bool = True,
) -> torch.LongTensor:
    """Concatenate documents (EOS between them) and cut into (N, seq_len) rows, each starting with BOS.

    BOS first because models are trained that way and their first position behaves differently (attention
    sinks): calibrating on rows that start mid-sentence without BOS skews the statistics. The ragged tail is
    dropped rather than padded so every position carries a real token.
    """
    if isinstance(texts, str):  # one document, not a sequence of characters
        texts = [texts]
    bos, eos, body = _row_layout(tokenizer, seq_len, add_bos)
    rows_wanted = None if max_tokens is None else max_tokens // seq_len
    if rows_wanted == 0:
        raise ValueError(f"max_tokens={max_tokens} is less than one sequence of seq_len={seq_len}; raise max_tokens.")
    need = None if rows_wanted is None else rows_wanted * body
    flat: list[int] = []
    with tqdm(total=need, desc="Tokenizing", unit=" tok", disable=None) as bar:
        for i, ids in enumerate(_token_stream(tokenizer, texts)):
            if i and eos is not None:
                flat.append(eos)
            flat.extend(ids)
            bar.update(len(ids) + (i > 0 and eos is not None))
            if need is not None and len(flat) >= need:
                break
    rows = len(flat) // body if rows_wanted is None else min(rows_wanted, len(flat) // body)
    if rows == 0:
        raise ValueError(
            f"the text gives only {len(flat)} tokens, but one sequence of seq_len={seq_len} needs {body} text tokens; "
            "pass more text or a smaller seq_len."
        )
    return _with_bos(torch.tensor(flat[: rows * body], dtype=torch.long).view(rows, body), bos)


def _row_layout(tokenizer, seq_len: int, add_bos: bool) -> tuple[int | None, int | None, int]:
    """(BOS or None, EOS or None, text tokens per row) of rows of seq_len tokens."""
    bos = tokenizer.bos_token_id if add_bos else None
    body = seq_len - (bos is not None)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after BOS; use seq_len >= 2.")
    return bos, tokenizer.eos_token_id, body


def _with_bos(ids: torch.LongTensor, bos: int | None) -> torch.LongTensor:
    """(rows, body) -> (rows, seq_len): BOS in front of every row, where there is one."""
    if bos is None:
        return ids
    return torch.cat([torch.full((ids.shape[0], 1), bos, dtype=torch.long), ids], dim=1)


def spread_tokens(
    tokenizer,
    texts: Sequence[str],
    *,
    seq_len: int,
    rows: int,
    add_bos: bool = True,
) -> torch.LongTensor:
    """`rows` sequences (rows, seq_len) taken from evenly spaced places across all of `texts`, not from its start.

    Calibration uses a few thousand tokens of corpora that are often far larger, and the start of a corpus is one
    book or one topic: on SmolLM2-135M at 1/4 of the KV cache, calibrating on the first 8,192 tokens of the Austen
    novels gave 1.50x the source perplexity on a held-out novel, 32 rows spread over the others 1.37-1.38x
    (benchmarks/calibration_rows.py; on out-of-domain text the sample moves the result more than the spreading
    does). The text is cut into `rows` equal stretches of characters and each row is
    tokenized from the start of its stretch (moved to the next word boundary), so only the rows' own text is
    tokenized and rows never overlap. Rows read on across document ends (EOS between documents), as in pack_tokens.
    Where the text is too short to give every stretch a full row, rows are packed from the start instead
    (pack_tokens), which then uses all of it.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if t]
    bos, eos, body = _row_layout(tokenizer, seq_len, add_bos)
    if rows < 1:
        raise ValueError(f"rows={rows}: ask for at least one sequence.")
    starts = list(itertools.accumulate((len(t) for t in texts), initial=0))  # document i spans starts[i]:starts[i+1]
    stretch = starts[-1] // rows
    if stretch == 0:
        return pack_tokens(tokenizer, texts, seq_len=seq_len, max_tokens=rows * seq_len, add_bos=add_bos)
    # ~10 characters a token is generous for prose; a stretch shorter than that is read whole
    want = min(stretch, 10 * body)
    pieces, owner = [], []  # each row's text, one piece per document it touches
    for r in range(rows):
        pos = r * stretch
        doc = bisect.bisect_right(starts, pos) - 1
        off = pos - starts[doc]
        if off:  # start at a word, not inside one (text with no spaces nearby, e.g. Chinese, starts where it is)
            near = texts[doc][off : off + 200]
            space = re.search(r"\s", near)
            if space:
                off += space.end()
            elif off + len(near) == len(texts[doc]):  # the document ends inside this word: start at the next one
                off = len(texts[doc])
        left = want
        while left > 0 and doc < len(texts):
            piece = texts[doc][off : off + left]
            pieces.append(piece)
            owner.append(r)
            left -= len(piece)
            doc, off = doc + 1, 0
    flat = [[] for _ in range(rows)]
    for r, ids in zip(owner, _token_stream(tokenizer, pieces)):
        if flat[r] and eos is not None:
            flat[r].append(eos)
        flat[r].extend(ids)
    if min(len(f) for f in flat) < body:
        logger.info(f"The text is too short to spread {rows} rows of {seq_len} tokens over it; packing from its start.")
        return pack_tokens(tokenizer, texts, seq_len=seq_len, max_tokens=rows * seq_len, add_bos=add_bos)
    return _with_bos(torch.tensor([f[:body] for f in flat], dtype=torch.long), bos)  # (rows, seq_len)


def corpus_rows(tokenizer, sources, *, seq_len: int, rows: int, text_field: str = "text") -> torch.LongTensor:
    """Calibration rows (rows, seq_len) spread over the text in `sources` (files, folders, datasets).

    Reads at most ~400 characters per token wanted (the whole of the Austen novels for 8,192 calibration tokens), so
    that a streamed Hub corpus is sampled from a bounded slice, not read to its end."""
    texts = load_texts(sources, text_field=text_field, max_chars=400 * rows * seq_len)
    return spread_tokens(tokenizer, texts, seq_len=seq_len, rows=rows)


@torch.no_grad()
def sample_texts_from_model(
    model,
    tokenizer,
    *,
    n_sequences: int,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
) -> torch.LongTensor:
    """Data-free calibration: (n_sequences, seq_len) token ids sampled from the model itself, starting at BOS.

    Pure sampling (no top-k / top-p, EOS suppressed until seq_len) so the text follows the model's own
    distribution, which is what the converted model has to reproduce.
    """
    from transformers import GenerationConfig

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither BOS nor EOS to start sampling from; pass calibration text.")
    logger.warning(
        f"No calibration text given: calibrating on {n_sequences} sequences the model generates itself. "
        "Real text from the target domain usually calibrates better."
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(
        do_sample=True, temperature=temperature,  # explicit values: unset ones are filled from the model's defaults
        top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
        pad_token_id=pad if pad is not None else start, eos_token_id=tokenizer.eos_token_id, bos_token_id=start,
    )  # fmt: skip
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for n in tqdm(range(0, n_sequences, batch_size), desc="Sampling calibration text", disable=None):
            b = min(batch_size, n_sequences - n)
            prompt = torch.full((b, 1), start, dtype=torch.long, device=device)
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
            out.append(ids[:, :seq_len].cpu())
    model.train(was_training)
    return torch.cat(out)
