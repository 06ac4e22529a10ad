"""From a run directory to activations: load the model, draw held-out sequences, and run
forward passes whose hooks keep only what each measurement reads, accumulating as they go so
that memory does not grow with the number of sequences."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from posleak.data import BatchStream, DataConfig, make_source, vocab_size_of
from posleak.log import log
from posleak.train import checkpoint
from posleak.train.config import RunConfig
from posleak.train.rundir import RunDir


@dataclass(frozen=True)
class Subject:
    """What an analysis reads: a model behind posleak's hook names (a Decoder, or a pretrained
    model in an adapter), how to draw its held-out sequences, and what the records say of it."""

    model: torch.nn.Module
    name: str  # the records' `run` field
    label: dict  # variant and seed
    train_len: int  # the default analysis length; T0 of the length extrapolation
    bos: str  # the default BOS policy of the held-out sequences
    seed: int  # seeds the random BOS replacement
    data: str  # the name of the text source
    draw: Callable[[int, int, str, str], torch.Tensor]  # (n, seq_len, bos, stream) -> tokens
    info: dict  # for analysis.json: run, checkpoint, step, val_loss, ...
    extrapolate: bool = True  # T0 is a training length, so multiples of it mean something
    bos_policies: tuple = ("always", "never")  # those the sequences can be drawn with
    copy_targets: Callable | None = None  # (N, L) tokens -> True where a token is a copy


def run_subject(run_dir: str | Path, step: int | None = None, source: str | None = None) -> Subject:
    """A posleak run at its latest good checkpoint (or at `step`), read on its own data or on
    `source`, which must share its vocabulary."""
    run_dir = Path(run_dir)
    model, cfg, state = RunDir(run_dir).load_model(step)
    data = cfg.data if not source else dataclasses.replace(cfg.data, source=source)
    size, trained = vocab_size_of(data), vocab_size_of(cfg.data)
    if size != trained:
        raise ValueError(
            f"data source {source!r} has a vocabulary of {size} tokens but the run was "
            f"trained on {cfg.data.source!r} with {trained}; its special tokens (BOS) "
            "would not match: analyse on data of the same kind"
        )

    def draw(n: int, seq_len: int, bos: str, stream_name: str) -> torch.Tensor:
        return held_out_tokens(data, cfg.seed, n, seq_len, bos, stream_name)

    info = {
        "run": str(run_dir),
        "checkpoint": state["checkpoint"],
        "step": state["step"],
        "checkpoint_digest": checkpoint.weights_digest(Path(state["checkpoint"])),
        "val_loss": final_val_loss(RunDir(run_dir)),
    }
    return Subject(
        model=model,
        name=run_dir.name,
        label=run_label(run_dir, cfg),
        train_len=cfg.data.seq_len,
        bos=cfg.data.bos,
        seed=cfg.seed,
        data=data.source,
        draw=draw,
        info=info,
        copy_targets=getattr(make_source(data), "copy_targets", None),
    )


def final_val_loss(run: RunDir) -> float | None:
    """The run's final validation loss from summary.json, which the analysis only reports:
    a damaged summary is named in a warning and costs only this number."""
    try:
        return (run.summary() or {}).get("final_val_loss")
    except ValueError as e:
        log.warning(f"warning: {e}; the analysis goes on without the run's validation loss")
        return None


def run_label(run_dir: Path, cfg: RunConfig) -> dict:
    """variant and seed of a run: the sweep's variant name if it has one, else from config."""
    info = RunDir(run_dir).sweep_label()
    if info:
        return {"variant": info["variant"], "seed": info["seed"]}
    m = cfg.model
    name = m.get("position", "rope")
    if m.get("window"):
        name += f"+w{m['window']}"
    if m.get("sink", "none") != "none":
        name += f"+sink_{m['sink']}"
    return {"variant": name, "seed": cfg.seed}


def held_out_tokens(
    data: DataConfig, seed: int, n: int, seq_len: int, bos: str, stream: str = "analysis"
) -> torch.Tensor:
    """n validation-split sequences of seq_len + 1 tokens from a stream of their own, so they
    never coincide with the batches used for evaluation during training. The model reads
    [:, :seq_len]; the last token is a next-token target."""
    cfg = dataclasses.replace(data, seq_len=seq_len, bos=bos)
    return BatchStream(cfg, seed, "val", n, stream=stream).batch(0)


Consumer = Callable[[torch.Tensor, torch.Tensor], None]  # (activation, sequence indices)


@torch.no_grad()
def stream(
    model: torch.nn.Module,  # a Decoder or a Pretrained adapter
    tokens: torch.Tensor,
    consumers: dict[str, Consumer],
    batch_size: int,
    interventions: list = (),
    targets: torch.Tensor | None = None,
    begin_at: tuple[int, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """Run tokens (N, T) through the model in mini-batches; each consumer receives its hook's
    activation (on the CPU) and the indices of the sequences in that batch. Without targets
    the output projection is skipped; with targets (N, T), the next token at every position,
    the same pass also gives every position's loss, (N, T) in float64. Given `begin_at`, (layer,
    the inputs of that block for every sequence, (N, T, d)), a Decoder's pass begins there:
    the hooks of earlier blocks do not fire."""
    rows = torch.arange(0)
    device = next(model.parameters()).device
    losses = None if targets is None else torch.empty(targets.shape, dtype=torch.float64)

    def hook(name):
        return lambda tensor, _: consumers[name](tensor.detach().cpu(), rows)

    with model.hooks([*interventions, *((name, hook(name)) for name in consumers)]):
        for start in range(0, len(tokens), batch_size):
            rows = torch.arange(start, min(start + batch_size, len(tokens)))
            if begin_at is None:
                final = model.hidden(tokens[rows].to(device))
            else:
                layer, inputs = begin_at
                final = model.hidden_from(inputs[rows].to(device), layer)
            if losses is not None:
                losses[rows] = position_losses(model, final, targets[rows].to(device))
    return losses


def position_losses(model, final: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position (B, T) from the final states (B, T, d), through the
    model's output projection a slice of tokens at a time, so that the logits held at once
    stay below 2^25 values whatever the vocabulary (Gemma 3's is 262k)."""
    step = max(1, (1 << 25) // model.cfg.vocab_size)
    parts = zip(final.flatten(0, 1).split(step), targets.flatten().split(step), strict=True)
    out = [F.cross_entropy(model.logits_of(x).float(), y, reduction="none") for x, y in parts]
    return torch.cat(out).view(targets.shape).double().cpu()


def token_losses(
    model: torch.nn.Module, tokens: torch.Tensor, max_attention: int, interventions: list = ()
) -> torch.Tensor:
    """Next-token loss of every position, (N, L - 1) for tokens (N, L), under interventions;
    in batches bounded by the attention maps' size."""
    T = tokens.shape[1] - 1
    batch = max(1, max_attention // (model.cfg.n_head * T * T))
    return stream(model, tokens[:, :-1], {}, batch, list(interventions), targets=tokens[:, 1:])


def store(target: torch.Tensor, pick) -> Consumer:
    """A consumer that writes pick(activation) into target's rows of its sequences."""

    def consume(tensor, rows):
        target[rows] = pick(tensor).float().cpu()

    return consume


def each(consumers: list[Consumer]) -> Consumer:
    """One consumer feeding several."""

    def consume(tensor, rows):
        for c in consumers:
            c(tensor, rows)

    return consume


class LogitSums:
    """Per-block sums of the pre-softmax logits over sequences, for one layer.

    Sequence n goes to block n mod n_blocks (n_blocks even, so even blocks hold the even
    sequences: half A, odd blocks half B). The halves give the split-half estimates, and the
    blocks are the units of the bootstrap. Only visible pairs are stored (half the memory of
    a causal T x T map, far less under a window). Sums are float32: a block holds a few dozen
    sequences, so rounding (~1e-7 relative) stays far below the split-half signal (tests
    recover planted terms through this path).
    """

    def __init__(self, n_blocks: int, n_head: int, visible: torch.Tensor):
        self.visible = visible
        self.pairs = visible.flatten().nonzero()[:, 0]  # (P,) flat indices of visible pairs
        self.dtype = torch.float32
        self.sums = torch.zeros(n_blocks, n_head, len(self.pairs), dtype=self.dtype)
        self.counts = torch.zeros(n_blocks, dtype=torch.float64)

    def add(self, scores: torch.Tensor, rows: torch.Tensor) -> None:
        blocks = rows % len(self.counts)
        values = scores.flatten(-2)[..., self.pairs].to(self.dtype)  # (B, H, P)
        self.sums.index_add_(0, blocks, values)
        self.counts.index_add_(0, blocks, torch.ones(len(rows), dtype=torch.float64))

    def block_means(self, chunk: int):
        """Packed mean logits of each block, `chunk` blocks at a time (float64)."""
        for start in range(0, len(self.counts), chunk):
            part = slice(start, start + chunk)
            yield self.sums[part].double() / self.counts[part, None, None]

    def half_mean(self, half: int) -> torch.Tensor:
        """Packed mean logits of half A (0) or B (1)."""
        return self.sums[half::2].double().sum(0) / self.counts[half::2].sum()

    def mean(self) -> torch.Tensor:
        """Packed mean logits over all sequences."""
        return self.sums.double().sum(0) / self.counts.sum()

    def restrict(self, pairs: torch.Tensor) -> LogitSums:
        """The same sums on a subset of the visible pairs, `pairs` a (T, T) boolean mask
        within them (the window's pairs at queries beyond the window, for a contrast)."""
        if (pairs & ~self.visible).any():
            raise ValueError("a restricted pair set must lie within the visible pairs")
        view = LogitSums.__new__(LogitSums)
        view.visible, view.dtype, view.counts = pairs, self.dtype, self.counts
        view.pairs = pairs.flatten().nonzero()[:, 0]
        view.sums = self.sums[..., pairs.flatten()[self.pairs]]
        return view

    def prefix(self, k: int) -> LogitSums:
        """The same sums restricted to queries i < k (keys j <= i < k): what an analysis at
        length k would have accumulated from the same sequences' prefixes."""
        T = self.visible.shape[0]
        keep = self.pairs // T < k  # pairs are ordered by query: a prefix of the packing
        view = LogitSums.__new__(LogitSums)
        view.visible, view.dtype, view.counts = self.visible[:k, :k], self.dtype, self.counts
        view.pairs = view.visible.flatten().nonzero()[:, 0]
        view.sums = self.sums[..., keep]
        return view
