"""nlgraph.tasks.linear_decay and train(lr_decay=True): lr_k = lr (1 - k / steps), written out here."""

import pytest
import torch
from torch import nn

from nlgraph import tasks


def test_linear_decay_follows_the_formula():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = tasks.linear_decay(opt, 5)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.3 * (1 - k / 5) for k in range(5)], rel=1e-12)
    assert opt.param_groups[0]["lr"] == 0.0


def test_train_with_lr_decay_runs_and_moves_the_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    tasks.train(model, x, y, steps=3, seed=0, batch=4, lr=1e-2, lr_decay=True)
    assert not torch.equal(model.weight.detach(), before)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_linear_decay_rejects_bad_steps(steps):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        tasks.linear_decay(opt, steps)
