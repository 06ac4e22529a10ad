"""Hostile input to the corpora: damaged token caches, bytes that are not UTF-8, too little
data. Each case through the real command line where there is one: a one-line error naming
the problem and the fix (no traceback), and nothing on disk lost or silently wrong."""

from pathlib import Path

import numpy as np
import pytest
from hostile import one_line_error, text_corpus, tiny_config


@pytest.mark.parametrize("damage", ["sevens", "truncate", "delete"])
def test_a_damaged_token_cache_is_detected_and_rebuilt(tmp_path, damage):
    text_corpus(tmp_path)
    folder = next((tmp_path / "cache" / "text").iterdir())
    good = np.load(folder / "train.npy").copy()
    target = folder / "train.npy"
    if damage == "sevens":
        arr = np.load(target)
        np.save(target, np.full_like(arr, 7))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:64])
    else:
        target.unlink()
    with pytest.warns(UserWarning, match="rebuilding the token cache"):
        _, again = text_corpus(tmp_path)
    assert np.array_equal(np.asarray(again.splits["train"][0]), good)


def test_invalid_utf8_trains_on_the_files_bytes_and_binary_files_are_refused(tmp_path, capsys):
    content = b"caf\xe9 \xff\xfe ok\n" * 100  # Latin-1 bytes: invalid UTF-8
    _, corpus = text_corpus(tmp_path, content)
    train_ids = np.asarray(corpus.splits["train"][0])
    assert bytes(train_ids[: len(content) // 2].astype(np.uint8)) == content[: len(content) // 2]
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    config = tiny_config(tmp_path, data__source=str(binary))
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match="looks binary")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"data__seq_len": 4000}, "do not fit the"),  # longer than the validation split
        ({"data__val_fraction": 0.9}, "leaves no train documents"),
    ],
)
def test_data_too_small_fails_before_the_run_directory_is_made(tmp_path, capsys, changes, match):
    text = tmp_path / "docs"
    text.mkdir()
    for i in range(40):
        (text / f"{i}.txt").write_text("a short document\n" * 5)
    changes = {"data__source": str(text), "data__cache_dir": str(tmp_path / "cache"), **changes}
    config = tiny_config(tmp_path, **changes)
    one_line_error(capsys, "train", config, "--out", tmp_path / "r", match=match)
    assert not (tmp_path / "r").exists()
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    from posleak.data.text import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("POSLEAK_CACHE", "")
    assert default_cache_dir() == Path.home() / ".cache" / "posleak"
