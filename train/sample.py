"""Sampling (`posleak sample RUN [--prompt TEXT] [--tokens N] [--top-k K] [--temperature T]
[--seed S] [--num-samples N] [--step S]`): a few lines of what a trained model writes.

Greedy by default (--top-k 1); --top-k K samples from the K most likely tokens at the given
temperature, reproducibly for a --seed. A model trained on text reads and writes text (bytes);
one trained on a synthetic source reads and writes token ids separated by spaces. The prompt
gets the run's BOS at position 0 when the run trained with one.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator

import torch

from posleak.data import ByteTokenizer
from posleak.data.batches import SYNTHETIC

MAX_TOKENS = 1 << 16  # new tokens of one sample: beyond this a typo, not a sample
MAX_SEED = 1 << 63  # torch.Generator takes a signed 64-bit seed
MAX_SAMPLES = 1000  # samples of one call: beyond this a typo


def generate(model: torch.nn.Module, prompt: list[int], tokens: int, **options) -> list[int]:
    """prompt followed by `tokens` new ids (options: those of new_ids)."""
    return list(prompt) + list(new_ids(model, prompt, tokens, **options))


@torch.no_grad()
def new_ids(
    model: torch.nn.Module,
    prompt: list[int],
    tokens: int,
    top_k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    context: int | None = None,
) -> Iterator[int]:
    """The `tokens` ids that follow prompt, one at a time as each is chosen (so that a long
    sample shows as it is written). Keys and values are cached (Decoder.decode) while the
    sequence fits the context; beyond it the last `context` ids are read afresh each step, at
    positions from 0, as the model was trained."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    cache = None
    for _ in range(tokens):
        if (context and len(ids) > context) or not hasattr(model, "decode"):
            window = torch.tensor([ids[-context:] if context else ids])
            logits = model(window)[0, -1].float()
        elif cache is None:  # the prompt, in one pass
            cache = [[] for _ in model.layers]
            logits = model.decode(torch.tensor([ids]), cache)[0, -1].float()
        else:  # only the newest token
            logits = model.decode(torch.tensor([ids[-1:]]), cache)[0, -1].float()
        if top_k == 1:
            ids.append(int(logits.argmax()))
        else:
            values, index = logits.topk(min(top_k, len(logits)))
            probs = torch.softmax(values / temperature, dim=-1)
            ids.append(int(index[torch.multinomial(probs, 1, generator=generator)]))
        yield ids[-1]


def sample_problems(
    tokens: int, top_k: int, temperature: float, seed: int, samples: int = 1
) -> list[str]:
    """What is wrong with sampling options, each with the accepted range."""
    out = []
    if not 1 <= samples <= MAX_SAMPLES:
        out.append(f"--num-samples must be between 1 and {MAX_SAMPLES}, got {samples}")
    elif seed + samples - 1 >= MAX_SEED:
        out.append(f"--seed + --num-samples - 1 must stay below 2^63, got {seed + samples - 1}")
    if not 1 <= tokens <= MAX_TOKENS:
        out.append(f"--tokens must be between 1 and {MAX_TOKENS}, got {tokens}")
    if top_k < 1:
        out.append(f"--top-k must be >= 1 (1 = greedy), got {top_k}")
    if not 0 < temperature < float("inf"):
        out.append(f"--temperature must be a finite number > 0, got {temperature}")
    if not 0 <= seed < MAX_SEED:
        out.append(f"--seed must be in [0, 2^63), got {seed}")
    return out


class Codec:
    """Prompts and outputs of one run: text for a byte vocabulary, token ids for synthetic
    data; the run's BOS first when it trained with one."""

    def __init__(self, model, cfg):
        self.text = cfg.data.source not in SYNTHETIC
        self.vocab_size = model.cfg.vocab_size
        if self.text and self.vocab_size != ByteTokenizer().size:
            raise ValueError("the run's model was not trained on posleak's byte vocabulary")
        bos = self.vocab_size - 3  # every posleak vocabulary ends with BOS, EOS, PAD
        self.start = [bos] if cfg.data.bos == "always" else []

    def encode(self, prompt: str) -> list[int]:
        if self.text:  # bytes that were not UTF-8 on the command line are taken as they are
            ids = ByteTokenizer().encode(prompt.encode("utf-8", "surrogateescape")).tolist()
        else:
            ids = [self._token_id(t) for t in prompt.split()]
        if not self.start and not ids:
            raise ValueError("this run trained without BOS: give a --prompt to continue")
        return self.start + ids

    def decode(self, ids: list[int]) -> str:
        return ByteTokenizer().decode(ids) if self.text else " ".join(map(str, ids))

    def pieces(self, ids: Iterable[int]) -> Iterator[str]:
        """decode() of a stream of ids, a piece per id as it comes (a character split over
        several bytes is written once whole; specials are dropped, invalid UTF-8 is U+FFFD)."""
        if not self.text:
            yield from (f" {i}" for i in ids)
            return
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for i in ids:
            if i < 256:
                yield decoder.decode(bytes([i]))
        yield decoder.decode(b"", final=True)

    def _token_id(self, text: str) -> int:
        if not text.isdigit() or int(text) >= self.vocab_size:
            raise ValueError(
                f"--prompt of a synthetic-data run is token ids below {self.vocab_size} "
                f"separated by spaces; got {text!r}"
            )
        return int(text)
