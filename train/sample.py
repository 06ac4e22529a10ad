"""Sampling (`posleak sample RUN [--prompt TEXT] [--tokens N] [--top-k K] [--temperature T]
[--seed S] [--step S]`): a few lines of what a trained model writes.

Greedy by default (--top-k 1); --top-k K samples from the K most likely tokens at the given
temperature, reproducibly for a --seed. A model trained on text reads and writes text (bytes);
one trained on a synthetic source reads and writes token ids separated by spaces. The prompt
gets the run's BOS at position 0 when the run trained with one.
"""

from __future__ import annotations

import torch

from posleak.data import ByteTokenizer
from posleak.data.batches import SYNTHETIC


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt: list[int],
    tokens: int,
    top_k: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    context: int | None = None,
) -> list[int]:
    """prompt followed by `tokens` new ids; each step reads the last `context` ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = list(prompt)
    for _ in range(tokens):
        window = torch.tensor([ids[-context:] if context else ids])
        logits = model(window)[0, -1].float()
        if top_k == 1:
            ids.append(int(logits.argmax()))
            continue
        values, index = logits.topk(min(top_k, len(logits)))
        probs = torch.softmax(values / temperature, dim=-1)
        ids.append(int(index[torch.multinomial(probs, 1, generator=generator)]))
    return ids


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
        if self.text:
            ids = ByteTokenizer().encode(prompt).tolist()
        else:
            ids = [self._token_id(t) for t in prompt.split()]
        if not self.start and not ids:
            raise ValueError("this run trained without BOS: give a --prompt to continue")
        return self.start + ids

    def decode(self, ids: list[int]) -> str:
        return ByteTokenizer().decode(ids) if self.text else " ".join(map(str, ids))

    def _token_id(self, text: str) -> int:
        if not text.isdigit() or int(text) >= self.vocab_size:
            raise ValueError(
                f"--prompt of a synthetic-data run is token ids below {self.vocab_size} "
                f"separated by spaces; got {text!r}"
            )
        return int(text)
