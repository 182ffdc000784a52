"""The Keras-style Adamax the reference ran (docs/model.md section 9)."""
import copy

import torch

from builders.train.optim import KerasAdamax


def test_keras_adamax_matches_its_equations():
    torch.manual_seed(0)
    w0 = torch.randn(5)
    w = torch.nn.Parameter(w0.clone())
    opt = KerasAdamax([{"params": [w], "weight_decay": 0.3}], lr=0.01, betas=(0.9, 0.999), eps=1e-3)
    m, u, ref = torch.zeros(5), torch.zeros(5), w0.clone()
    for t in range(1, 6):
        g = torch.randn(5) * 10 ** -t          # small gradients: where eps placement matters
        w.grad = g.clone()
        opt.step()
        g = g + 0.3 * ref                      # coupled L2
        m = 0.9 * m + 0.1 * g
        u = torch.maximum(0.999 * u, g.abs())
        ref = ref - 0.01 / (1 - 0.9 ** t) * m / (u + 1e-3)
        assert torch.allclose(w.detach(), ref, atol=1e-7), t


def test_keras_and_torch_eps_placement_differ():
    """torch.optim.Adamax puts eps inside the max; with tiny gradients the steps differ."""
    torch.manual_seed(1)
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    ka = KerasAdamax([a], lr=0.01, eps=1e-3)
    tb = torch.optim.Adamax([b], lr=0.01, eps=1e-3)
    g = torch.full((3,), 1e-4)
    a.grad, b.grad = g.clone(), g.clone()
    ka.step()
    tb.step()
    # Keras: 0.01 * g / (g + eps) = 0.01 * 1e-4 / 1.1e-3; torch: 0.01 * g / (g + eps) as well on
    # the first step, but its eps enters the running max and persists; after a zero gradient
    # the two diverge.
    a.grad, b.grad = torch.zeros(3), torch.zeros(3)
    ka.step()
    tb.step()
    assert not torch.allclose(a.detach(), b.detach())


def test_state_round_trips_through_state_dict():
    w = torch.nn.Parameter(torch.ones(4))
    opt = KerasAdamax([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())    # state_dict shares tensors with the live state
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = KerasAdamax([w2], lr=0.1)
    opt2.load_state_dict(sd)
    w.grad = w2.grad = torch.full((4,), 0.5)
    opt.step()
    opt2.step()
    assert torch.equal(w.detach(), w2.detach())
