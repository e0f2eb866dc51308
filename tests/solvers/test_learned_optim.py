"""LearnedOptimizer (torch.optim wrapper of a learned optimizer) and its checkpoint files."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from metaray.platform.learned_optimizer import from_file, load, save
from metaray.solvers.core import BilevelProblem
from metaray.solvers.learned import OptimizerNet, init_state, init_weights, learned_unroll
from metaray.solvers.learned_optim import LearnedOptimizer, checkpoint

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D64)


def _data():
    g = torch.Generator().manual_seed(5)
    xs = torch.randn(16, 3, generator=g, dtype=D64)
    return xs, xs.sum(1, keepdim=True).sin()


class ModuleProblem(BilevelProblem):
    """The same regression as a functional problem: the l2o solver's view of the model."""

    def __init__(self, model):
        self.model = model

    def init_inner(self, x, task):
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}

    def inner_loss(self, x, y, task):
        xs, ys = task
        return ((torch.func.functional_call(self.model, y, (xs,)) - ys) ** 2).mean()

    outer_loss = inner_loss


@pytest.mark.parametrize("arch", ["lstm", "mlp"])
def test_wrapped_optimizer_follows_the_solvers_trajectory(arch):
    """Stepping an nn.Module with LearnedOptimizer (per parameter tensor, in place) equals the solver's functional
    unroll over the concatenated params (coordinate-wise nets), and it lowers the loss."""
    net = OptimizerNet(arch, output_scale=0.05)
    w = init_weights(net, hidden=5, layers=2 if arch == "lstm" else 1, seed=1, dtype=D64)
    w["out.b"] = w["out.b"] - 1.0  # a bias toward descending: with sign inputs this moves like sign-SGD
    model, task = _model(), _data()
    problem = ModuleProblem(model)
    y0 = problem.init_inner({}, task)
    st = init_state(net, w, sum(v.numel() for v in y0.values()), D64)
    y_ref, _, _, losses = learned_unroll(problem, net, w, y0, st, task, 6)

    opt = LearnedOptimizer(model.parameters(), w, net)
    for _ in range(6):
        opt.zero_grad()
        problem.inner_loss({}, dict(model.named_parameters()), task).backward()
        opt.step()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), y_ref[k].detach(), rtol=1e-12, atol=1e-13)
    assert all(float(s["step"]) == 6 for s in opt.state.values())
    final = float(problem.inner_loss({}, {k: v.detach() for k, v in model.named_parameters()}, task))
    assert final == pytest.approx(losses[-1], rel=1e-12)
    assert losses[-1] < 0.9 * losses[0]


def test_state_dict_and_file_round_trip(tmp_path):
    """A saved state dict (weights_only load) restores net, weights and per-coordinate state: continuing after a
    reload gives bit-identical params to never stopping. The platform's save / from_file does the same."""
    net = OptimizerNet("lstm", output_scale=0.02)
    w = init_weights(net, hidden=4, seed=7, dtype=D64)
    task = _data()

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            ModuleProblem(model).inner_loss({}, dict(model.named_parameters()), task).backward()
            opt.step()

    a = _model()
    opt_a = LearnedOptimizer(a.parameters(), w, net)
    train(a, opt_a, 3)
    torch.save(opt_a.state_dict(), tmp_path / "opt.pt")
    b = _model()
    b.load_state_dict(a.state_dict())
    opt_b = LearnedOptimizer(b.parameters(), init_weights(net, hidden=4, seed=99, dtype=D64), net, scale=3.0)
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt_b.param_groups[0]["scale"] == 1.0
    train(a, opt_a, 3)
    train(b, opt_b, 3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)

    path = save(tmp_path / "lstm.pt", w, net)
    w2, net2 = load(path)
    assert net2 == net and all(torch.equal(w[k], w2[k]) for k in w)
    c = _model()
    train(c, from_file(path, c.parameters()), 6)
    d = _model()
    train(d, LearnedOptimizer(d.parameters(), w, net), 6)
    for pc, pd in zip(c.parameters(), d.parameters()):
        assert torch.equal(pc, pd)


def test_bad_inputs_give_clear_errors(tmp_path):
    net = OptimizerNet()
    w = init_weights(net, hidden=4)
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="scale must be a number > 0"):
        LearnedOptimizer(params, w, net, scale=0)
    with pytest.raises(TypeError, match="net must be a metaray.solvers.learned.OptimizerNet"):
        LearnedOptimizer(params, w, "lstm")
    with pytest.raises(ValueError, match=r"arch='mlp' need keys 'mlp0\.\*'"):
        LearnedOptimizer(params, w, OptimizerNet("mlp"))
    with pytest.raises(FileNotFoundError, match="no learned-optimizer file"):
        from_file(tmp_path / "missing.pt", params)
    torch.save({"weights": w}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a learned-optimizer checkpoint"):
        from_file(tmp_path / "foreign.pt", params)
    (tmp_path / "torn.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a readable learned-optimizer file"):
        load(tmp_path / "torn.pt")
    data = checkpoint(w, net)
    data["net"] = dict(data["net"], depth=3)
    with pytest.raises(ValueError, match="bad 'net' entry"):
        LearnedOptimizer.from_checkpoint(params, data)
