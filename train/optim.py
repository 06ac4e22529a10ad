"""AdamW: torch's fused kernel on CUDA, elsewhere posleak's copy of the arithmetic of
torch.optim.AdamW(foreach=True), without torch.optim.

torch.optim's step and add_param_group import torch._dynamo on first use, about 1.4 s at
every start of a run on a CPU; posleak's class does the same updates (bit-identical on CPU,
tested) with the same state_dict layout. On a GPU that second is nothing beside start-up, and
the fused kernel (one launch per step instead of one per operation and tensor list) is the
tuned path. Checkpoints written by any of them load into every other (`load`).
"""

from __future__ import annotations

import torch

HYPER = ("lr", "betas", "eps", "weight_decay")  # what a checkpoint's groups carry over


def make(groups, lr: float, betas: tuple[float, float], fused: bool):
    """torch's fused AdamW (for parameters on CUDA) or posleak's."""
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)
    return AdamW(groups, lr, betas)


def name_of(optimizer) -> str:
    """Which AdamW a run used, for env.json."""
    fused = isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused")
    return "torch fused AdamW" if fused else "posleak AdamW (torch's foreach arithmetic)"


def load(optimizer, state_dict: dict) -> None:
    """Restore a checkpoint's moments and hyper-parameters into either kind. The optimizer
    keeps its own implementation settings: torch.optim would otherwise take the saved
    groups whole, and a run written by posleak's class (no `fused` key) would resume on a
    GPU unfused."""
    saved = state_dict["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise ValueError("optimizer state does not fit these parameter groups")
    groups = [
        {
            **{k: v for k, v in own.items() if k != "params"},
            **{k: old[k] for k in HYPER},
            "params": old["params"],
        }
        for own, old in zip(optimizer.param_groups, saved, strict=True)
    ]
    optimizer.load_state_dict({"state": state_dict["state"], "param_groups": groups})


class AdamW:
    """Decoupled weight decay Adam over parameter groups {"params", "weight_decay"}."""

    def __init__(self, groups, lr: float, betas: tuple[float, float], eps: float = 1e-8):
        self.param_groups = [
            {
                "params": list(g["params"]),
                "lr": lr,
                "betas": tuple(betas),
                "eps": eps,
                "weight_decay": g["weight_decay"],
            }
            for g in groups
        ]
        self.state: dict[torch.Tensor, dict] = {}

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        grads = [p.grad for p in params]
        states = [self._state_of(p) for p in params]
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
        if group["weight_decay"] != 0:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [s.item() for s in steps]
        step_size = [-(lr / (1 - beta1**n)) for n in counts]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [(1 - beta2**n) ** 0.5 for n in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)

    def _state_of(self, p: torch.Tensor) -> dict:
        if p not in self.state:
            self.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return self.state[p]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        """torch.optim's layout: state by parameter index, groups with index lists."""
        index = {p: i for i, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**group, "params": list(range(start, start + n))})
            start += n
        return {"state": {index[p]: s for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self._params()
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not fit these parameter groups")
        for group, old in zip(self.param_groups, saved, strict=True):
            for key in ("lr", "eps", "weight_decay"):
                group[key] = old[key]
            group["betas"] = tuple(old["betas"])
        self.state = {
            params[int(i)]: {
                "step": s["step"].detach().float().cpu().reshape(()),
                "exp_avg": s["exp_avg"].to(params[int(i)]),
                "exp_avg_sq": s["exp_avg_sq"].to(params[int(i)]),
            }
            for i, s in state_dict["state"].items()
        }
