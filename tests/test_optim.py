"""posleak's AdamW against torch.optim.AdamW: the same numbers, the same state_dict layout;
torch's fused AdamW (what a CUDA run uses; its CPU kernel here) loads either's checkpoints."""

import copy
import subprocess
import sys

import torch

from posleak.train import optim
from posleak.train.optim import AdamW


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)
    )


def _groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def _train(model, opt, steps, start=0, total=None):
    """Steps start..start+steps-1 of one fixed stream of batches and learning rates."""
    total = total or steps
    for step in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (1 + step) / total  # a schedule, as training sets it
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_updates_are_bit_identical_to_torch_adamw():
    ours, theirs = _model(), _model()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95))
    _train(ours, AdamW(_groups(ours), **kwargs), 25)
    _train(theirs, torch.optim.AdamW(_groups(theirs), foreach=True, **kwargs), 25)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dicts_load_across_implementations_and_resume_exactly():
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95))
    straight = _model()
    _train(straight, AdamW(_groups(straight), **kwargs), 10)
    for first_kind, second_kind in ((torch.optim.AdamW, AdamW), (AdamW, torch.optim.AdamW)):
        first = _model()
        first_opt = _make(first_kind, first, kwargs)
        _train(first, first_opt, 5, total=10)
        second = _model()
        second.load_state_dict(first.state_dict())
        second_opt = _make(second_kind, second, kwargs)
        second_opt.load_state_dict(_portable(first_opt.state_dict()))
        _train(second, second_opt, 5, start=5, total=10)
        for a, b in zip(second.parameters(), straight.parameters(), strict=True):
            assert torch.equal(a, b), (first_kind, second_kind)


def _make(kind, model, kwargs):
    extra = {"foreach": True} if kind is torch.optim.AdamW else {}
    return kind(_groups(model), **kwargs, **extra)


def _portable(state_dict):
    """A state_dict as a checkpoint stores it: group settings plus torch's defaults."""
    defaults = torch.optim.AdamW([torch.zeros(1)]).state_dict()["param_groups"][0]
    groups = [{**defaults, **group} for group in state_dict["param_groups"]]
    return {"state": state_dict["state"], "param_groups": groups}


def test_a_training_step_never_imports_torch_dynamo():
    code = (
        "import sys, torch\n"
        "from posleak.train.optim import AdamW\n"
        "m = torch.nn.Linear(4, 4)\n"
        "opt = AdamW([{'params': m.parameters(), 'weight_decay': 0.1}], 1e-3, (0.9, 0.95))\n"
        "m(torch.randn(2, 4)).sum().backward()\n"
        "torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)\n"
        "opt.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_fused_adamw_follows_the_same_arithmetic():
    """torch's fused kernel computes the update in another order: equal to rounding."""
    ours, fused = _model(), _model()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95))
    _train(ours, optim.make(_groups(ours), **kwargs, fused=False), 25)
    opt = optim.make(_groups(fused), **kwargs, fused=True)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    _train(fused, opt, 25)
    for a, b in zip(ours.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert optim.name_of(opt) == "torch fused AdamW"
    assert optim.name_of(AdamW(_groups(ours), **kwargs)).startswith("posleak AdamW")


def test_a_checkpoint_moves_between_fused_and_posleaks_adamw():
    """A run written on a GPU resumes on a CPU and the other way round: the moments and the
    hyper-parameters arrive exactly, the fused optimizer stays fused (torch.optim alone would
    take the saved groups' missing `fused` as None), and training goes on as the first
    optimizer would have gone on, to rounding."""
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95))
    for first_fused, second_fused in ((True, False), (False, True)):
        first = _model()
        first_opt = optim.make(_groups(first), **kwargs, fused=first_fused)
        _train(first, first_opt, 5, total=10)
        saved = copy.deepcopy(first_opt.state_dict())  # a checkpoint shares no tensor
        saved = {
            "state": saved["state"],
            "param_groups": [
                {k: g[k] for k in (*optim.HYPER, "params")} for g in saved["param_groups"]
            ],
        }  # what posleak's class writes: the hyper-parameters only
        second = _model()
        second.load_state_dict(first.state_dict())
        second_opt = optim.make(_groups(second), **kwargs, fused=second_fused)
        optim.load(second_opt, saved)
        assert all(g.get("fused", False) == second_fused for g in second_opt.param_groups)
        moved = second_opt.state_dict()["state"]
        for i, entry in first_opt.state_dict()["state"].items():
            for key, value in entry.items():
                assert torch.equal(moved[i][key].reshape(value.shape), value), key
        _train(second, second_opt, 5, start=5, total=10)
        _train(first, first_opt, 5, start=5, total=10)
        for a, b in zip(second.parameters(), first.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
