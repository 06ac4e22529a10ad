"""Hugging Face datasets as a text source: a configuration, streamed documents, and a fast,
clear failure when the hub cannot be reached."""

import json
import time

import numpy as np
import pytest

from posleak.data import DataConfig, make_source
from posleak.data.text import hub_reachable, parse_hf

datasets = pytest.importorskip("datasets", reason="the hf extra is not installed")


def test_a_config_comes_from_the_source_name_or_from_data_hf_config():
    assert parse_hf("hf:wikitext:wikitext-103-raw-v1") == ("wikitext", "wikitext-103-raw-v1")
    assert parse_hf("hf:wikitext", "wikitext-2-raw-v1") == ("wikitext", "wikitext-2-raw-v1")
    assert parse_hf("hf:user/data") == ("user/data", None)
    with pytest.raises(ValueError, match="give the config once"):
        parse_hf("hf:wikitext:a", "b")


def test_a_local_dataset_is_streamed_into_the_token_cache(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [f"document {i}: " + "word " * (i % 7 + 3) for i in range(60)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    calls = []
    load = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    cfg = DataConfig(source=f"hf:{folder}", cache_dir=str(tmp_path / "cache"), seq_len=16)
    corpus = make_source(cfg)
    assert calls == [{"split": "train", "streaming": True}]
    train_docs = [d for i, d in enumerate(docs) if (i + 1) % 20]
    expected = b"".join(d.encode() + bytes([0]) for d in train_docs)  # EOS as a placeholder
    tokens = np.asarray(corpus.splits["train"][0])
    assert len(tokens) == len(expected)
    eos = tokens == corpus.eos
    assert bytes(tokens[~eos].astype(np.uint8)) == b"".join(d.encode() for d in train_docs)
    assert eos.sum() == len(train_docs)


def test_an_unreachable_hub_fails_fast_with_a_clear_message(tmp_path):
    if hub_reachable():
        pytest.skip("this machine reaches huggingface.co")
    cfg = DataConfig(source="hf:someone/some-dataset", cache_dir=str(tmp_path / "cache"))
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="huggingface.co cannot be reached"):
        make_source(cfg)
    assert time.perf_counter() - started < 5  # not 30 s of retries
