"""The training loop: config -> run directory with metrics, checkpoints and exact resume.

Exactness rests on three facts: batches are a pure function of (seed, step, rank), the
learning rate is a pure function of the step, and a checkpoint holds every other piece of
state (weights, optimizer moments, RNG states). A resumed run therefore replays nothing
and skips nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from posleak.data import BatchStream, vocab_size_of
from posleak.log import clock, log
from posleak.model import ConfigError, Decoder
from posleak.train import checkpoint, optim, tracking
from posleak.train.config import RunConfig, flatten, to_toml, tomllib
from posleak.train.environment import (
    autocast,
    check_fits,
    describe,
    flops_per_token,
    resolve_compile,
    resolve_device,
    resolve_precision,
)
from posleak.train.rundir import RunDir

# keys that may differ when a run is resumed: the budget may grow, logging may change
RESUMABLE_CHANGES = ("train.steps", "train.threads", "train.device", "log.")
PARENT_ENV = "POSLEAK_PARENT_PID"  # set by a sweep: its child stops cleanly once it is gone
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


class RunExistsError(RuntimeError):
    pass


class TrainingDiverged(RuntimeError):
    pass


class RunInterrupted(RuntimeError):
    pass


def lr_at(step: int, cfg) -> float:
    """Linear warmup over `warmup` steps, constant until `decay_start` (0: no plateau), then
    cosine decay to lr * min_lr_ratio at the last step."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    start = max(t.warmup, t.decay_start)
    if step < start:
        return t.lr
    progress = (step - start) / max(1, t.steps - start)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device):
    """AdamW, torch's fused kernel on CUDA (train/optim.py); weight decay on matrices only
    (not norms or sink logits)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    betas = (cfg.train.beta1, cfg.train.beta2)
    return optim.make(groups, cfg.train.lr, betas, fused=device.type == "cuda")


def training_bytes(m, batch: int, T: int) -> float:
    """A rough upper estimate of training memory: fp32 weights, gradients and two AdamW
    moments, plus the activations autograd keeps (SDPA keeps no T x T attention map)."""
    params = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    params += m.n_layer * (4 * m.d_model**2 + 3 * m.d_model * m.ff_width)
    params += (m.scheme.max_len(m) or 0) * m.d_model  # a learned position table
    per_token = m.n_layer * (12 * m.d_model + 3 * m.ff_width) + 2 * m.vocab_size  # SDPA: O(T)
    return 16.0 * params + 4.0 * batch * T * per_token


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


class Run:
    """One training run in one directory; rank 0 writes, every rank computes."""

    def __init__(self, cfg: RunConfig, out: str | Path, resume: bool = False):
        self.out = Path(out)
        self.dir = RunDir(self.out)
        if cfg.log.wandb:
            tracking.require_wandb()  # before anything is written
        self.world, self.rank = _join_process_group()
        self.cfg = self._check_run_dir(cfg, resume)
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.device = resolve_device(self.cfg.train.device)
        self.train_stream, self.val_stream = (
            BatchStream(self.cfg.data, self.cfg.seed, split, self.cfg.train.batch_size)
            for split in ("train", "val")
        )
        for stream in (self.train_stream, self.val_stream):  # data too short: fail before writing
            stream.batch(0)
        self.model_cfg = self.cfg.model_config(vocab_size_of(self.cfg.data))
        check_fits(
            training_bytes(self.model_cfg, self.cfg.train.batch_size, self.cfg.data.seq_len),
            "training this model",
            "lower model.d_model, d_ff, vocab_size or max_seq_len, or train.batch_size",
        )
        self.precision, reason = resolve_precision(
            self.cfg.train.precision, self.device, self.model_cfg.d_model
        )
        torch.manual_seed(self.cfg.seed)
        self.model = Decoder(self.model_cfg, seed=self.cfg.seed).to(self.device)
        t, T = self.cfg.train, self.cfg.data.seq_len
        flops = flops_per_token(self.model, T) * t.batch_size * T * t.steps
        self.compiled = resolve_compile(t.compile, self.device, flops)
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.ckpt_root = self.dir.checkpoints_dir
        self.step, self.elapsed = 0, 0.0
        resumed = self._restore() if resume else False
        self.forward_model = self._wrap(self.model)
        if self.rank == 0:
            self._write_header(reason, resumed=resumed)
            if resumed:  # said once every check has passed
                log.info(f"resuming {self.out} from step {self.step} of {self.cfg.train.steps}")
        self._stop_signal = None

    def _restore(self) -> bool:
        """Continue from the newest good checkpoint, if any; True when one was loaded."""
        checkpoint.clean_temporaries(self.ckpt_root)
        state = checkpoint.load_latest(self.ckpt_root, self.model, self.optimizer)
        if state:
            self.step, self.elapsed = state["step"], state["elapsed_s"]
        if self.step > self.cfg.train.steps:
            raise ConfigError(
                f"{self.out} is at step {self.step}, past train.steps="
                f"{self.cfg.train.steps}; resume with train.steps >= {self.step}"
            )
        return state is not None

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls: DDP across ranks, compiled when asked."""
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.compiled[0]:
            model = torch.compile(model)
        return model

    # ------------------------------------------------------------------ run directory
    def _check_run_dir(self, cfg: RunConfig, resume: bool) -> RunConfig:
        stored = self.dir.config_file
        if not stored.exists() or not self._took_a_step():
            return cfg  # nothing to keep: a run that failed before its first step starts over
        if not resume:
            raise RunExistsError(
                f"{self.out} already holds a run. Continue it with --resume, or start over "
                f"deliberately: remove it (rm -r {self.out}) or pick another --out"
            )
        previous = self.dir.read_config()[0].to_dict()
        now = cfg.to_dict()
        now["model"] = {**previous["model"], **now["model"]}  # defaults were filled in
        changed = [
            key
            for key, value in flatten(now).items()
            if flatten(previous).get(key) != value and not key.startswith(RESUMABLE_CHANGES)
        ]
        if changed:
            raise ConfigError(
                f"cannot resume {self.out} with a different config: {changed} changed "
                f"(only {RESUMABLE_CHANGES} may change on resume); continue it with its own "
                f"config: posleak train --resume {self.out}; or use another --out for a new run"
            )
        return cfg

    def derived(self) -> dict:
        """Values that follow from the config: written into config.toml's [derived] table."""
        return {
            "ff_width": self.model_cfg.ff_width,
            "rope_effective_base": self.model_cfg.rope_effective_base,
            "precision": self.precision,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "n_params_non_embedding": self.model.num_params(),
            "tokens_per_step": self.cfg.train.batch_size * self.cfg.data.seq_len,
            "world_size": self.world,
        }

    def _took_a_step(self) -> bool:
        metrics = self.dir.metrics_file
        has_metrics = metrics.exists() and metrics.stat().st_size > 0
        return has_metrics or bool(self.dir.checkpoints())

    def _write_header(self, reason: str, resumed: bool) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        derived = self.derived()
        self.dir.write("config.toml", to_toml(self.cfg, self.model_cfg, derived))
        env_path = self.dir.env_file
        env = describe(self.device, self.precision, reason, self.world, self.compiled)
        env["optimizer"] = optim.name_of(self.optimizer)
        if resumed and env_path.exists():
            first = self.dir.read_json(env_path)
            first.setdefault("resumes", []).append({**env, "from_step": self.step})
            env = first
        self.dir.write(env_path.name, json.dumps(env, indent=2) + "\n")
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Keep the records up to the restored step; later ones will be recomputed."""
        if self.dir.metrics_file.exists():
            kept = self.dir.metrics_lines(up_to_step=self.step)
            self.dir.write(self.dir.metrics_file.name, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.data.seq_len
        last_val = None
        with self._signals_stop_cleanly(), self._metrics_log() as record_metrics:
            window_start, window_steps = time.perf_counter(), 0
            parent = int(os.environ.get(PARENT_ENV, "0"))
            if t.ckpt_initial and self.step == 0:
                self.save_checkpoint()
            while self.step < t.steps:
                loss = self._train_step()
                if parent and os.getppid() != parent:  # the sweep was killed: do not run on
                    self._stop_signal = "the sweep's exit"
                self.step += 1
                window_steps += 1
                done = self.step == t.steps
                evaluate = self.step % t.eval_every == 0 or done
                if self.step % t.log_every == 0 or evaluate:
                    record = self._record(loss, window_steps * tokens_per_step, window_start)
                    if evaluate:
                        record.update(self.evaluate())
                        last_val = record["val_loss"]
                    record_metrics(record)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % t.ckpt_every == 0 or done or self._stop_signal:
                    self.save_checkpoint()
                if self._stop_signal:
                    raise RunInterrupted(
                        f"stopped by {self._stop_signal} after step {self.step}; checkpoint "
                        f"saved, continue with: posleak train --resume {self.out}"
                    )
        summary = {
            "steps": self.step,
            "final_val_loss": last_val if last_val is not None else self.evaluate()["val_loss"],
            "tokens": self.step * tokens_per_step,
            "elapsed_s": self.elapsed,
            "precision": self.precision,
        }
        if self.rank == 0:
            self.dir.write("summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _record(self, loss: float, window_tokens: int, window_start: float) -> dict:
        """The metrics line of this step; the wall time since window_start joins elapsed."""
        now = time.perf_counter()
        self.elapsed += now - window_start
        return {
            "step": self.step,
            "train_loss": loss,
            "lr": lr_at(self.step - 1, self.cfg),
            "tokens": self.step * self.cfg.train.batch_size * self.cfg.data.seq_len,
            "tokens_per_s": window_tokens / (now - window_start),
            "elapsed_s": self.elapsed,
        }

    @contextlib.contextmanager
    def _metrics_log(self):
        """A function that records one metrics dict: metrics.jsonl, progress, wandb."""
        if self.rank != 0:
            yield lambda record: None
            return
        bar = self.cfg.log.progress and sys.stderr.isatty()
        wandb_run = self._open_wandb() if self.cfg.log.wandb else None
        total = self.cfg.train.steps
        with self.dir.append(self.dir.metrics_file.name) as f:
            progress = tqdm(total=total, initial=self.step, disable=not bar)

            def write(record: dict) -> None:
                f.write(json.dumps(record) + "\n")
                f.flush()
                fields = progress_fields(record, total)
                if bar:
                    progress.update(record["step"] - progress.n)
                    progress.set_postfix_str(fields)
                elif self.cfg.log.progress:
                    log.info(f"step {record['step']}/{total} | {fields}")
                if wandb_run:
                    wandb_run.log(record, step=record["step"])

            try:
                yield write
            finally:
                progress.close()
                if wandb_run:
                    wandb_run.finish()

    def _train_step(self) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        tokens = self.train_stream.batch(self.step, self.rank, self.world).to(self.device)
        self.model.train()
        loss = self._loss(self.forward_model, tokens)
        value = self._mean_over_ranks(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"loss is {value} at step {self.step + 1}; stopped before updating the weights; "
                + self._advice()
            )
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def _loss(self, model, tokens: torch.Tensor) -> torch.Tensor:
        try:
            with autocast(self.device, self.precision):
                return lm_loss(model, tokens)
        except FloatingPointError as err:
            raise TrainingDiverged(
                f"step {self.step + 1}: {err}; stopped before updating the weights; "
                + self._advice()
            ) from None

    def _advice(self) -> str:
        return (
            f"the last good checkpoint is in "
            f"{self.ckpt_root}. Lower train.lr, keep train.grad_clip > 0, or use fp32"
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """val_loss: the mean loss over the first `eval_batches` validation batches (the same
        every time). A corpus that marks its copy targets (backcopy) adds the mean loss over
        copy targets and over the others, which have different floors."""
        self.model.eval()
        copies = getattr(self.val_stream.source, "copy_targets", None)
        total, split = 0.0, torch.zeros(4, dtype=torch.float64)  # copy sum, n, other sum, n
        for i in range(self.cfg.train.eval_batches):
            tokens = self.val_stream.batch(i, self.rank, self.world).to(self.device)
            total += self._mean_over_ranks(self._loss(self.model, tokens))
            if copies is not None:
                split += self._split_loss(tokens, copies)
        out = {"val_loss": total / self.cfg.train.eval_batches}
        if copies is not None:
            if self.world > 1:
                dist.all_reduce(split)
            out["val_copy_loss"] = (split[0] / split[1]).item() if split[1] else None
            out["val_bigram_loss"] = (split[2] / split[3]).item() if split[3] else None
        return out

    def _split_loss(self, tokens: torch.Tensor, copies) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = self.model(tokens[:, :-1])
        losses = F.cross_entropy(
            logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none"
        ).double()
        is_copy = torch.from_numpy(copies(tokens.cpu().numpy())[:, 1:]).flatten().to(losses.device)
        return torch.stack(
            [losses[is_copy].sum(), is_copy.sum(), losses[~is_copy].sum(), (~is_copy).sum()]
        ).cpu()

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value.item()

    def save_checkpoint(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingDiverged(
                f"non-finite weights after step {self.step}, not saved; {self._advice()}"
            )
        if self.rank == 0:
            extra = {"elapsed_s": self.elapsed, "precision": self.precision}
            checkpoint.save(
                self.ckpt_root,
                self.step,
                self.model,
                self.optimizer,
                extra,
                self.cfg.train.keep_checkpoints,
            )
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def _signals_stop_cleanly(self):
        """SIGINT/SIGTERM finish the current step, checkpoint, then stop."""

        def handler(signum, frame):
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _open_wandb(self):
        config = tomllib.loads(to_toml(self.cfg, self.model_cfg, self.derived()))
        return tracking.open_run(self.out, self.cfg.log.wandb_project, config)


def progress_fields(record: dict, total: int) -> str:
    """train loss, val loss (when evaluated), tokens/s, elapsed and ETA, for a progress line."""
    parts = [f"train loss {record['train_loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
    if record.get("val_copy_loss") is not None:
        parts.append(f"copy {record['val_copy_loss']:.3f} / bigram {record['val_bigram_loss']:.3f}")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    elapsed = record["elapsed_s"]
    eta = elapsed / record["step"] * (total - record["step"])
    parts.append(f"elapsed {clock(elapsed)} | eta {clock(eta)}")
    return " | ".join(parts)


def _join_process_group() -> tuple[int, int]:
    """(world size, rank) under torchrun; the process group is joined when there are ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world, dist.get_rank() if world > 1 else 0


def train(cfg: RunConfig, out: str | Path, resume: bool = False) -> dict:
    """Train into `out`; the run directory is locked against a second writer meanwhile."""
    out = Path(out)
    run_dir = RunDir(out)
    run_dir.check_for_training()  # before the lock writes anything into it
    created = not out.exists()
    lock = run_dir.lock() if int(os.environ.get("RANK", "0")) == 0 else None
    with _sigterm_interrupts():  # during set-up; fit() then stops at a step boundary
        if lock:
            lock.acquire()
        try:
            return Run(cfg, out, resume).fit()
        finally:
            _finish(out, lock, created)


def _finish(out: Path, lock, created: bool) -> None:
    """Leave the process group, release the lock, remove what a failed start left."""
    with _sigterm_interrupts(ignore=True):  # a second signal must not cut the clean-up short
        if dist.is_initialized():  # a gloo group left to the interpreter's exit can abort it
            dist.destroy_process_group()
        if lock:
            lock.release()
            _remove_if_unused(out, created)


@contextlib.contextmanager
def _sigterm_interrupts(ignore: bool = False):
    """SIGTERM raises KeyboardInterrupt (exit 130, lock released), or is ignored."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _remove_if_unused(out: Path, created: bool) -> None:
    """A run that failed before writing anything leaves nothing behind: the guard file, and
    the folder itself when this run created it (a user's own empty folder stays)."""
    with contextlib.suppress(OSError):  # clean-up must never hide the error that ended the run
        if {p.name for p in out.iterdir()} <= {".lock.guard"}:
            (out / ".lock.guard").unlink(missing_ok=True)
            if created:
                out.rmdir()
