"""Data: the defining property of each corpus, purity of batches, splits, and clear errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from posleak.data import BatchStream, ByteTokenizer, DataConfig, make_source
from posleak.data.synthetic import Backcopy, Markov, bigram_counts
from posleak.data.tokenizer import Vocabulary


# ------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text", ["", "hello world", "naïve café – ∑ 漢字 🙂\n\ttab"])
def test_byte_tokenizer_round_trips_utf8(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.max(initial=0) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos, *ids, tok.eos, tok.pad]) == text


def test_special_ids_are_documented_values():
    tok = ByteTokenizer()
    assert (tok.bos, tok.eos, tok.pad, tok.size) == (256, 257, 258, 259)


def test_vocabulary_too_small_for_specials_is_refused():
    with pytest.raises(ValueError, match="use vocab_size >= 5"):
        Vocabulary(1)
    with pytest.raises(ValueError, match="vocab_size=4"):
        make_source(DataConfig(source="uniform", vocab_size=4))


# ------------------------------------------------------------------ stationarity
def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 3.719 is alpha = 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def position_homogeneity_chi2(tokens: np.ndarray, vocab: int) -> tuple[float, float]:
    """Chi-square test that every position (column) has the same token distribution."""
    counts = np.stack([np.bincount(col, minlength=vocab) for col in tokens.T])  # (T, V)
    counts = counts[:, counts.sum(axis=0) >= 5 * tokens.shape[1]]  # drop very rare tokens
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = (counts.shape[0] - 1) * (counts.shape[1] - 1)
    return stat, chi2_critical(df)


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(source="uniform", vocab_size=16, bos="never", seq_len=24),
        DataConfig(
            source="markov", vocab_size=16, bos="never", seq_len=24, params={"markov_order": 2}
        ),
        DataConfig(
            source="markov",
            vocab_size=16,
            bos="never",
            seq_len=24,
            params={"markov_concentration": 1},
        ),
        DataConfig(
            source="induction",
            vocab_size=16,
            bos="never",
            seq_len=24,
            params={"induction_segment": 4},
        ),
        DataConfig(source="bible", bos="never", seq_len=24),
    ],
    ids=["uniform", "markov2", "markov1", "induction", "bible-random-offsets"],
)
def test_per_position_token_histograms_do_not_differ_beyond_chance(cfg):
    stream = BatchStream(cfg, seed=0, split="train", batch_size=6000)
    tokens = stream.batch(0).numpy()
    stat, critical = position_homogeneity_chi2(tokens, make_source(cfg).size)
    assert stat < critical, (stat, critical)


def test_stationarity_check_detects_a_chain_started_off_stationarity():
    """The same test must fail for a chain whose first token is always 0."""
    chain = Markov(13, order=1, concentration=0.1, corpus_seed=0)
    chain.state_cdf = np.ones_like(chain.state_cdf)  # every sequence starts in state 0
    index = np.arange(6000)
    tokens = chain.sequences(np.uint64(1), index, 24)
    stat, critical = position_homogeneity_chi2(tokens, 16)
    assert stat > critical


def test_markov_stationary_distribution_is_a_fixed_point_and_matches_samples():
    chain = Markov(5, order=2, concentration=0.5, corpus_seed=3)
    n = 5
    flow = (chain.stationary[:, None] * chain.transitions).reshape(n, n, n).sum(0).reshape(-1)
    assert np.allclose(flow, chain.stationary, atol=1e-12)
    tokens = chain.sequences(np.uint64(7), np.arange(4000), 30)
    empirical = np.bincount(tokens.ravel(), minlength=n) / tokens.size
    assert np.allclose(empirical, chain.token_marginal(), atol=0.01)
    # transitions: empirical P(next | context) for the most common context
    ctx = tokens[:, :-2] * n + tokens[:, 1:-1]
    common = np.bincount(ctx.ravel()).argmax()
    nxt = tokens[:, 2:][ctx == common]
    assert np.allclose(
        np.bincount(nxt, minlength=n) / len(nxt), chain.transitions[common], atol=0.03
    )


def test_induction_sequences_contain_their_copied_segments():
    src = make_source(
        DataConfig(source="induction", vocab_size=259, params={"induction_segment": 6})
    )
    seqs = src.sequences(np.uint64(2), np.arange(50), 64)
    for row in seqs:
        segments = {tuple(row[s : s + 6]) for s in range(64 - 6 + 1)}
        assert len(segments) < 64 - 6 + 1  # some 6-gram repeats (by chance: ~1e-9 for 256 tokens)


# ------------------------------------------------------------------ batches
def test_batches_are_pure_functions_of_seed_split_step_rank():
    cfg = DataConfig(source="markov", seq_len=16)
    a = BatchStream(cfg, seed=1, split="train", batch_size=8)
    b = BatchStream(cfg, seed=1, split="train", batch_size=8)
    assert torch.equal(a.batch(5), b.batch(5))
    assert not torch.equal(a.batch(5), a.batch(6))
    assert not torch.equal(a.batch(5), BatchStream(cfg, 2, "train", 8).batch(5))
    assert not torch.equal(a.batch(5), BatchStream(cfg, 1, "val", 8).batch(5))
    ranks = torch.cat([a.batch(5, rank=r, world_size=2) for r in range(2)])
    assert torch.equal(ranks, a.batch(5))  # two ranks partition the global batch exactly
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        a.batch(0, world_size=3)


@pytest.mark.parametrize("bos", ["always", "never"])
def test_bos_policy(bos):
    cfg = DataConfig(source="uniform", seq_len=32, bos=bos)
    batch = BatchStream(cfg, 0, "train", 64).batch(0)
    bos_id = make_source(cfg).bos
    assert batch.shape == (64, 33)
    assert (batch[:, 0] == bos_id).all() == (bos == "always")
    assert not (batch[:, 1:] == bos_id).any()


# ------------------------------------------------------------------ text
def split_documents(tokens: np.ndarray, eos: int) -> set[bytes]:
    docs = np.split(tokens, np.where(tokens == eos)[0] + 1)
    return {bytes(doc.astype(np.uint8)) for doc in docs if len(doc)}


def test_bible_train_and_val_hold_disjoint_documents():
    corpus = make_source(DataConfig(source="bible"))
    train, _ = corpus.splits["train"]
    val, _ = corpus.splits["val"]
    assert len(val) > 50_000 and len(train) > 19 * len(val) * 0.8
    assert not split_documents(np.asarray(train), corpus.eos) & split_documents(
        np.asarray(val), corpus.eos
    )


def test_document_alignment_starts_sequences_at_document_starts(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"<{i:02d}> " + "word " * (i + 10))
    cfg = DataConfig(
        source=str(tmp_path),
        seq_len=8,
        bos="never",
        align="document",
        cache_dir=str(tmp_path / "c"),
    )
    batch = BatchStream(cfg, 0, "train", 32).batch(0)
    assert (batch[:, 0] == ord("<")).all()


def test_tiny_corpus_splits_into_disjoint_ranges_and_cache_follows_content(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("abcdefghij" * 50)
    cfg = DataConfig(source=str(path), seq_len=8, cache_dir=str(tmp_path / "c"), val_fraction=0.1)
    first = make_source(cfg)
    train, val = (np.asarray(first.splits[s][0]) for s in ("train", "val"))
    assert len(train) + len(val) == 500 + 2  # each split ends with an EOS
    path.write_text("zyxwvutsrq" * 50)
    make_source.cache_clear()
    second = make_source(cfg)
    assert second.key != first.key
    assert np.asarray(second.splits["train"][0])[0] == ord("z")


def test_bad_sources_give_specific_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        make_source(DataConfig(source=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="every matching file is empty"):
        make_source(DataConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "short.txt").write_text("short text " * 10)
    cfg = DataConfig(source=str(tmp_path / "short.txt"), seq_len=500, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="lower data.seq_len"):
        BatchStream(cfg, 0, "train", 2).batch(0)
    with pytest.raises((ImportError, RuntimeError), match="hf"):
        make_source(DataConfig(source="hf:no-such/dataset"))


def test_markov_loss_floors_match_a_closed_form_and_an_empirical_estimate():
    chain = Markov(2, order=1, concentration=1.0, corpus_seed=0)
    (a, b) = chain.transitions[0, 1], chain.transitions[1, 0]  # leave 0, leave 1
    pi = np.array([b, a]) / (a + b)

    def h(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    assert math.isclose(chain.entropy_rate(), pi[0] * h(a) + pi[1] * h(b), rel_tol=1e-9)
    assert math.isclose(chain.unigram_entropy(), h(pi[0]), rel_tol=1e-9)
    order2 = Markov(5, order=2, concentration=0.5, corpus_seed=3)
    seqs = order2.sequences(np.uint64(7), np.arange(64), 400)
    context = seqs[:, :-2] * 5 + seqs[:, 1:-1]
    probs = order2.transitions[context, seqs[:, 2:]]
    assert abs(-np.log(probs).mean() - order2.entropy_rate()) < 0.05
    assert order2.entropy_rate() < order2.unigram_entropy()


def test_backcopy_table_is_the_normalised_pair_counts_of_the_commonest_bytes():
    text = b"abracadabra!"  # a:5 b:2 r:2 c:1 d:1 !:1
    alphabet, counts = bigram_counts(text, 3)
    assert alphabet == b"abr"  # ties (b, r) by byte value
    kept = [alphabet.index(c) for c in b"abraaabra"]  # c, d, ! dropped before pairing
    expected = np.zeros((3, 3), dtype=int)
    for x, y in itertools.pairwise(kept):
        expected[x, y] += 1
    assert (counts == expected).all()
    chain = Backcopy.from_text(text, 3, "b")
    assert np.allclose(chain.transitions, expected / expected.sum(axis=1, keepdims=True))
    assert chain.triggers.tolist() == [1]
    with pytest.raises(ValueError, match="backcopy_triggers"):
        Backcopy.from_text(text, 3, "z")
    with pytest.raises(ValueError, match="vocab_size"):
        Backcopy.from_text(text, 7, "a")


def test_backcopy_copies_exactly_after_triggers_and_marks_those_targets():
    chain = make_source(
        DataConfig(source="backcopy", vocab_size=35, params={"backcopy_triggers": "eth"})
    )
    seqs = chain.sequences(np.uint64(3), np.arange(300), 200)
    assert not chain.is_trigger[seqs[:, 0]].any()  # a copy's source is always in context
    after = chain.is_trigger[seqs[:, 1:-1]]
    assert (seqs[:, 2:][after] == seqs[:, :-2][after]).all()
    marked = chain.copy_targets(seqs)
    assert not marked[:, :2].any() and (marked[:, 2:] == after).all()
    assert abs(after.mean() - chain.copy_fraction()) < 0.01
    # where the chain is free, it does not copy more often than the table says
    free = ~after & (chain.transitions[seqs[:, 1:-1], seqs[:, :-2]] < 0.5)
    assert (seqs[:, 2:][free] == seqs[:, :-2][free]).mean() < 0.5
    with_bos = (
        BatchStream(DataConfig(source="backcopy", vocab_size=35, bos="always"), 0, "train", 8)
        .batch(0)
        .numpy()
    )
    shifted = chain.copy_targets(with_bos)
    assert not shifted[:, :3].any()  # BOS, then a first token that is never a trigger
    assert (with_bos[:, 2:][shifted[:, 2:]] == with_bos[:, :-2][shifted[:, 2:]]).all()


def test_backcopy_loss_floors_match_a_renewal_argument_and_samples():
    # tokens {0, 1}, trigger 1: "1" only ever appears as "0 1 0", so a cycle from a fresh 0
    # is "0" (prob 1 - a) or "1 0" (prob a, one copy): copy share a / (1 + a), and every
    # non-copy token is drawn from row 0, so its floor is h(a).
    a = 0.3
    chain = Backcopy(np.array([[1 - a, a], [0.6, 0.4]]), [1])
    h = -(a * math.log(a) + (1 - a) * math.log(1 - a))
    assert math.isclose(chain.copy_fraction(), a / (1 + a), rel_tol=1e-9)
    assert math.isclose(chain.bigram_floor(), h, rel_tol=1e-9)
    assert math.isclose(chain.entropy_rate(), h / (1 + a), rel_tol=1e-9)
    assert chain.copy_floor() == 0.0
    # a denser chain against the true predictor's loss on samples
    rng = np.random.default_rng(0)
    dense = Backcopy(rng.dirichlet(np.ones(5), size=5), [1, 3])
    seqs = dense.sequences(np.uint64(5), np.arange(256), 400)
    free = ~dense.copy_targets(seqs)[:, 1:]
    probs = dense.transitions[seqs[:, :-1], seqs[:, 1:]][free]
    assert abs(-np.log(probs).mean() - dense.bigram_floor()) < 0.02
    assert abs((~free).mean() - dense.copy_fraction()) < 0.01


def test_a_mixture_holds_kjv_crops_and_backcopy_in_one_byte_vocabulary():
    """Each sequence is either a crop of the KJV split or a Backcopy sequence written in the
    bytes its alphabet stands for (copying exactly after a trigger character), in the share
    asked for; which one is a pure function of the sequence's index."""
    cfg = DataConfig(source="mixture", seq_len=64, vocab_size=35, params={"mixture_share": 0.3})
    mixture = make_source(cfg)
    assert mixture.size == ByteTokenizer().size and mixture.bos == ByteTokenizer().bos
    stream = BatchStream(cfg, 0, "train", 400)
    rows = stream.batch(0).numpy()[:, 1:]
    copy = mixture.is_copy_sequence(stream.key, np.arange(400))
    n = len(copy)
    assert abs(copy.mean() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # binomial, 4 sd
    text = bytes(mixture.text.splits["train"][0].astype(np.uint8))
    for row in rows[~copy][:40]:
        assert bytes(row.astype(np.uint8)) in text  # a crop of the corpus
    alphabet = set(mixture.backcopy.alphabet)
    triggers = {ord(c) for c in "eth"}
    for row in rows[copy]:
        assert set(row.tolist()) <= alphabet
        after = np.isin(row[1:-1], list(triggers))
        assert (row[2:][after] == row[:-2][after]).all()  # the copy rule, in bytes
    assert ((rows[copy][:, 2:] != rows[copy][:, :-2]).mean()) > 0.5  # not copying elsewhere
    again = BatchStream(cfg, 0, "train", 100)  # other batch sizes draw the same sequences
    assert np.array_equal(
        np.concatenate([again.batch(s).numpy() for s in range(4)]), stream.batch(0).numpy()
    )
    assert DataConfig(source="mixture", params={"mixture_share": 1.5}).problems() == [
        "data.params.mixture_share must be in [0, 1], got 1.5"
    ]


def test_a_sources_parameters_are_its_own_and_older_runs_still_load(tmp_path):
    """[data.params] holds a source's own parameters (declared by its class); a run holds its
    own source's, each given or at its default; another source's is left unused. A
    config.toml written when they were [data] fields reads as the same data, and a config
    spelling them so is told where they went."""
    import tomli_w
    import tomllib

    from posleak.model import ConfigError
    from posleak.train.config import build, from_resolved, to_toml

    markov = build({"data.source": "markov", "data.params.markov_order": 2})
    assert markov.data.built().params == {"markov_order": 2, "markov_concentration": 0.1}
    assert markov.data.param("markov_order") == 2 and make_source(markov.data).order == 2
    text = build({"data.source": "bible", "data.params.markov_order": 2})  # shared base config
    assert text.data.built().params == {}
    written = tomllib.loads(to_toml(markov))
    assert written["data"]["params"] == {"markov_order": 2, "markov_concentration": 0.1}
    old = {k: v for k, v in written["data"].items() if k != "params"}
    old |= {"markov_order": 2, "markov_concentration": 0.1, "induction_segment": 8,
            "induction_copies": 2, "backcopy_triggers": "eth", "mixture_share": 0.5,
            "hf_config": "", "hf_split": "train", "hf_field": "text"}  # fmt: skip
    (tmp_path / "config.toml").write_text(tomli_w.dumps({**written, "data": old}))
    assert from_resolved(tmp_path / "config.toml").data.built() == markov.data.built()
    with pytest.raises(ConfigError, match="data.markov_order is now data.params.markov_order"):
        build({"data.markov_order": 2})
    with pytest.raises(ConfigError, match="data.params.markov_ordr is not a parameter of any"):
        build({"data.params.markov_ordr": 2})
