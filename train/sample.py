"""`posleak sample RUN [--prompt TEXT] [--tokens N] [--top-k K] [--temperature T] [--seed S]
[--step S]`: a few lines of what a trained model writes.

Greedy by default (--top-k 1); --top-k K samples from the K most likely tokens at the given
temperature, reproducibly for a --seed. A model trained on text reads and writes text (bytes);
one trained on a synthetic source reads and writes token ids separated by spaces. The prompt
gets the run's BOS at position 0 when the run trained with one.
"""

from __future__ import annotations

import argparse
import sys

import torch

from posleak.data import ByteTokenizer
from posleak.train.rundir import RunDir

SYNTHETIC = ("uniform", "markov", "induction")


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


def run(args: argparse.Namespace) -> int:
    try:
        if args.tokens < 1 or args.top_k < 1 or not args.temperature > 0:
            raise ValueError("--tokens and --top-k must be >= 1 and --temperature > 0")
        model, cfg, _ = RunDir(args.run).load_model(args.step)
        text = cfg.data.source not in SYNTHETIC
        if text and model.cfg.vocab_size != ByteTokenizer().size:
            raise ValueError(f"{args.run} was not trained on posleak's byte vocabulary")
        bos = model.cfg.vocab_size - 3  # every posleak vocabulary ends with BOS, EOS, PAD
        prompt = [bos] if cfg.data.bos == "always" else []
        if text:
            prompt += ByteTokenizer().encode(args.prompt).tolist()
        else:
            prompt += [_token_id(t, model.cfg.vocab_size) for t in args.prompt.split()]
        if not prompt:
            raise ValueError("this run trained without BOS: give a --prompt to continue")
        ids = generate(
            model, prompt, args.tokens, args.top_k, args.temperature, args.seed, cfg.data.seq_len
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if text:
        print(ByteTokenizer().decode(ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _token_id(text: str, vocab_size: int) -> int:
    if not text.isdigit() or int(text) >= vocab_size:
        raise ValueError(
            f"--prompt of a synthetic-data run is token ids below {vocab_size} separated by "
            f"spaces; got {text!r}"
        )
    return int(text)
