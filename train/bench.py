"""`posleak bench [--quick] [--out FILE]` (also `python -m posleak bench`)

Measures, in one process, so that every figure is a ratio to something measured alongside:
  - the machine's matmul throughput in fp32 and bf16 (a large square product): the peak;
  - training step time (forward + backward + AdamW) and tokens/s for each positional
    variant, fp32 vs bf16 autocast, fast (SDPA) vs eager attention, posleak's AdamW vs
    torch's fused one, each as a fraction of the measured peak (MFU);
  - batch assembly throughput and analysis throughput.

FLOP convention (nanoGPT's / PaLM's): 6 * N + 12 * L * d * T per token, N = parameters
that take part in matrix products (every block weight and the LM head, not the embedding
lookup), the second term the attention products QK^T and AV (forward + backward), with no
discount for the causal mask or a window.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from posleak.data import BatchStream, DataConfig
from posleak.log import log
from posleak.model import Decoder, ModelConfig
from posleak.train import optim
from posleak.train.config import preset, presets
from posleak.train.environment import (
    autocast,
    cpu_has_fast_bf16,
    device_name,
    flops_per_token,
    resolve_device,
)
from posleak.train.reference import ReferenceGPT, TransformersLlama


def matmul_peak(dtype: torch.dtype, device, n: int, repeats: int) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matrix product."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class TrainCase:
    """One training configuration, built once, stepped on demand (forward, backward, AdamW)."""

    def __init__(
        self,
        name,
        cfg: ModelConfig,
        B,
        T,
        precision,
        device,
        eager=False,
        reference=False,
        compiled=False,
        fused=False,
    ):
        self.name, self.cfg, self.B, self.T, self.precision = name, cfg, B, T, precision
        self.device = device
        if reference == "llama":  # transformers' own Llama at posleak's shape
            self.model = TransformersLlama(cfg, T).to(device)
        elif reference:  # the GPT-2 comparator at the same width, depth, heads and context
            args = (cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.d_model, T)
            self.model = ReferenceGPT(*args).to(device)
        else:
            self.model = Decoder(cfg).to(device)
            self.model.force_eager = eager
        self.forward = torch.compile(self.model) if compiled else self.model
        groups = [{"params": self.model.parameters(), "weight_decay": 0.1}]
        self.opt = optim.make(groups, 1e-4, (0.9, 0.95), fused)
        self.tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
        self.times: list[float] = []
        self.first_step_s: float | None = None  # includes compilation for a compiled case

    def step(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        with autocast(self.device, self.precision):
            logits = self.forward(self.tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), self.tokens[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - t


def measure(cases: list[TrainCase], rounds: int, steps: int) -> None:
    """Round-robin over the cases so that machine noise (shared VMs) hits them alike, each
    round starting one case later so that no case always runs first (or always after the
    same neighbour); each case keeps every timed step, after two warm-up steps."""
    started = time.perf_counter()
    for case in cases:
        case.first_step_s = case.step()
        case.step()
    for r in range(rounds):
        for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
            case.times += [case.step() for _ in range(steps)]
        took = time.perf_counter() - started
        eta = took / (r + 1) * (rounds - r - 1)
        log.info(
            f"[bench] {cases[0].name.split(':')[0]} d={cases[0].cfg.d_model}: round {r + 1}/"
            f"{rounds} of {len(cases)} cases | elapsed {took:.0f}s | eta {eta:.0f}s"
        )


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_config(d: int, T: int, variant: str, layers: int = 4) -> ModelConfig:
    """A preset of train/presets.toml at the benchmark's size; a window is scaled to T/4."""
    extra: dict = {"params": {}}
    for key, value in preset(variant).items():
        section, _, name = key.removeprefix("model.").rpartition(".")
        (extra["params"] if section == "params" else extra)[name] = value
    if "window" in extra:
        extra["window"] = T // 4
    return ModelConfig(n_layer=layers, n_head=max(1, d // 64), d_model=d, max_seq_len=T, **extra)


def train_row(case: TrainCase, peaks: dict) -> dict:
    seconds = statistics.median(case.times)
    fpt = flops_per_token(case.model, case.T)
    tps = case.B * case.T / seconds
    return {
        "name": case.name,
        "d_model": case.cfg.d_model,
        "seq_len": case.T,
        "batch": case.B,
        "precision": case.precision,
        "step_ms": seconds * 1e3,
        "step_ms_min": min(case.times) * 1e3,
        "tokens_per_s": tps,
        "flops_per_token": fpt,
        "mfu": fpt * tps / peaks[case.precision],
        "first_step_s": case.first_step_s,
    }


def has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def batch_throughput(source: str, B: int, T: int, batches: int) -> float:
    stream = BatchStream(DataConfig(source=source, seq_len=T), 0, "train", B)
    stream.batch(0)
    t = time.perf_counter()
    for step in range(batches):
        stream.batch(step)
    return batches * B * (T + 1) / (time.perf_counter() - t)


def run_bench(quick: bool) -> dict:
    device = resolve_device("auto")
    n = 512 if quick else 2048
    peaks = {"fp32": matmul_peak(torch.float32, device, n, 3 if quick else 5)}
    bf16_ok = device.type == "cuda" or cpu_has_fast_bf16()
    if bf16_ok:
        peaks["bf16"] = matmul_peak(torch.bfloat16, device, n, 3 if quick else 5)
    rounds, steps = (1, 2) if quick else (5, 2)
    d, T, B = (64, 64, 4) if quick else (256, 256, 16)
    cases = [
        TrainCase(f"variant:{v}", model_config(d, T, v), B, T, "fp32", device) for v in presets()
    ]
    rope = model_config(d, T, "rope")
    cases.append(TrainCase("rope:eager-attention", rope, B, T, "fp32", device, eager=True))
    measure(cases, rounds, steps)
    rows = [train_row(case, peaks) for case in cases]
    sizes = [(64, 64, 4)] if quick else [(128, 64, 12), (256, 256, 16), (512, 256, 32)]
    for d_, T_, B_ in sizes:  # one size at a time keeps memory low; precisions interleaved
        precisions = ("fp32", "bf16") if bf16_ok else ("fp32",)
        cfg = model_config(d_, T_, "rope")
        cases = [TrainCase(f"size:d{d_}", cfg, B_, T_, p, device) for p in precisions]
        cases.append(
            TrainCase(f"size:d{d_}:nope", model_config(d_, T_, "nope"), B_, T_, "fp32", device)
        )
        cases.append(
            TrainCase(f"size:d{d_}:reference", cfg, B_, T_, "fp32", device, reference=True)
        )
        cases.append(  # torch's fused AdamW (what a CUDA run uses) in place of posleak's
            TrainCase(f"size:d{d_}:fused-adamw", cfg, B_, T_, "fp32", device, fused=True)
        )
        if has_transformers():  # transformers' Llama, in every precision measured
            cases += [
                TrainCase(f"size:d{d_}:llama-{p}", cfg, B_, T_, p, device, reference="llama")
                for p in precisions
            ]
        if not quick:  # torch.compile takes 20-30 s per model on a CPU
            cases.append(
                TrainCase(f"size:d{d_}:compiled", cfg, B_, T_, "fp32", device, compiled=True)
            )
        measure(cases, rounds, steps)
        rows += [train_row(case, peaks) for case in cases]
    data = {src: batch_throughput(src, 16, 256, 5 if quick else 50) for src in ("bible", "markov")}
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_flops": peaks,
        "train": rows,
        "batch_tokens_per_s": data,
    }


def print_table(result: dict) -> None:
    peaks = result["matmul_peak_flops"]
    print(f"device {result['device']} ({result['device_name']}), {result['threads']} threads")
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    head = ("case", "d", "T", "B", "prec", "ms/step", "tok/s", "MFU")
    print("{:28s} {:>4s} {:>4s} {:>3s} {:>5s} {:>8s} {:>9s} {:>6s}".format(*head))
    for r in result["train"]:
        cells = (r["name"], r["d_model"], r["seq_len"], r["batch"], r["precision"])
        cells += (r["step_ms"], r["tokens_per_s"], r["mfu"])
        print("{:28s} {:4d} {:4d} {:3d} {:>5s} {:8.1f} {:9.0f} {:6.1%}".format(*cells))
    fp32 = {r["name"]: r["tokens_per_s"] for r in result["train"] if r["precision"] == "fp32"}
    ratios = [f"{k[8:]} {v / fp32['variant:nope']:.2f}" for k, v in fp32.items() if "variant:" in k]
    print("variant speed / nope: " + ", ".join(ratios))
    rope = fp32["variant:rope"]
    print(f"eager / fast attention: {fp32['rope:eager-attention'] / rope:.2f}")
    by_size: dict = {}
    for r in result["train"]:
        if r["name"].startswith("size:"):
            kind = r["name"].split(":")[2] if r["name"].count(":") == 2 else r["precision"]
            by_size.setdefault(r["d_model"], {})[kind] = r["tokens_per_s"]
    for dm, p in by_size.items():
        ref = p["reference"]
        print(
            f"d_model={dm}, fp32 tokens/s over the GPT-2 reference: rope "
            f"{p['fp32'] / ref:.2f}, nope {p['nope'] / ref:.2f}"
            + (f", transformers Llama {p['llama-fp32'] / ref:.2f}" if "llama-fp32" in p else "")
        )
        for prec in ("fp32", "bf16"):
            if f"llama-{prec}" in p:
                print(
                    f"d_model={dm}, {prec}: posleak rope / transformers Llama "
                    f"{p[prec] / p[f'llama-{prec}']:.2f}, RoPE overhead over nope "
                    + (f"{p['nope'] / p['fp32'] - 1:.1%}" if prec == "fp32" else "–")
                )
        fused = p["fused-adamw"] / p["fp32"]
        print(f"torch fused AdamW / posleak AdamW at d_model={dm}: {fused:.2f}x")
        if "bf16" in p:
            print(f"bf16 / fp32 at d_model={dm}: {p['bf16'] / p['fp32']:.2f}x")
        if "compiled" in p:
            first = next(
                r["first_step_s"] for r in result["train"] if r["name"] == f"size:d{dm}:compiled"
            )
            print(
                f"compiled / eager fp32 at d_model={dm}: {p['compiled'] / p['fp32']:.2f}x, "
                f"first step (with compilation) {first:.1f}s"
            )
    batch = result["batch_tokens_per_s"]
    print("batch assembly: " + ", ".join(f"{k} {v / 1e6:.1f}M tok/s" for k, v in batch.items()))
    for a in result.get("analysis", []):  # measured by the command (posleak/commands.py)
        shape = f"{a['seqs']} x {a['seq_len']} tokens (4 layers, d={a['d_model']})"
        scale = f", rope scale {a['rope_scale']:g}" if a["rope_scale"] else ""
        peak = "unknown" if a["peak_rss_mb"] is None else f"{a['peak_rss_mb']:.0f} MB"
        print(f"analysis of {shape}{scale}: {a['seconds']:.1f}s, peak RSS {peak}")
