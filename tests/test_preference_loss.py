"""Preference losses against their papers' formulas, transcribed here in float64 with plain
Python math, pair by pair (independently of fastvlm.train.preference). The losses are a few
float64 operations per pair: a relative bound of 64 float64 roundings covers them."""
import math

import pytest
import torch

from fastvlm.train.preference import dpo_loss, orpo_loss, preference_loss, simpo_loss

TOL = 64 * torch.finfo(torch.float64).eps


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def _pairs(n=7):
    """Summed answer log-probs (negative, answers of a few to ~40 tokens) and token counts."""
    tokens = torch.randint(1, 40, (2, n))
    logp = -torch.rand(2, n, dtype=torch.float64) * 3 * tokens
    return logp[0].requires_grad_(), logp[1].requires_grad_(), tokens[0], tokens[1]


def _close(got, want: float):
    got = float(got.detach())
    assert abs(got - want) <= TOL * max(1.0, abs(want)), (got, want)


def _mean(values):
    return math.fsum(values) / len(values)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_is_eq7_of_rafailov_2023(label_smoothing, seed):
    cw, cl, _, _ = _pairs()
    rw, rl = cw.detach() + torch.randn(7, dtype=torch.float64), cl.detach() + torch.randn(7, dtype=torch.float64)
    beta = 0.1 + float(torch.rand(()))
    loss, m = dpo_loss(cw, cl, rw, rl, beta=beta, label_smoothing=label_smoothing)
    want, margins, accurate = [], [], []
    for i in range(7):
        h = beta * ((cw.tolist()[i] - float(rw[i])) - (cl.tolist()[i] - float(rl[i])))
        want.append(-(1 - label_smoothing) * _log_sigmoid(h) - label_smoothing * _log_sigmoid(-h))
        margins.append(h)
        accurate.append(beta * (cw.tolist()[i] - float(rw[i])) > beta * (cl.tolist()[i] - float(rl[i])))
    _close(loss, _mean(want))
    _close(m["reward_margin"], _mean(margins))
    _close(m["reward_accuracy"], _mean(accurate))
    _close(m["chosen_reward"], _mean([beta * (cw.tolist()[i] - float(rw[i])) for i in range(7)]))
    _close(m["chosen_logp"], _mean(cw.tolist()))
    _close(m["rejected_logp"], _mean(cl.tolist()))


def test_dpo_is_ln2_when_policy_is_reference(seed):
    for dtype in (torch.float32, torch.float64):
        cw, cl, _, _ = _pairs()
        loss, m = dpo_loss(cw.to(dtype), cl.to(dtype), cw.detach().to(dtype), cl.detach().to(dtype), beta=0.5)
        assert abs(float(loss.detach()) - math.log(2)) <= 2 * torch.finfo(dtype).eps  # log sigma(0) rounds once
        assert float(m["reward_margin"]) == 0.0 and float(m["reward_accuracy"]) == 0.0


def test_label_smoothing_moves_the_optimum_to_sigma_equal_one_minus_eps():
    """cDPO's smoothed loss, as a function of the margin h, is smallest where
    sigma(beta h) = 1 - eps (its gradient there is 0), and is symmetric at eps -> 0.5."""
    beta, eps = 0.5, 0.2
    h_star = math.log((1 - eps) / eps) / beta
    for h, sign in ((h_star, 0), (h_star - 1, -1), (h_star + 1, 1)):
        cw = torch.tensor([h], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        loss, _ = dpo_loss(cw, zero, zero, zero, beta=beta, label_smoothing=eps)
        (g,) = torch.autograd.grad(loss, cw)
        assert (abs(float(g)) < 1e-12) if sign == 0 else (math.copysign(1, float(g)) == sign)
    cw = torch.tensor([0.7, -1.3], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    a = dpo_loss(cw, zero, zero, zero, label_smoothing=0.4999)[0]
    b = dpo_loss(-cw, zero, zero, zero, label_smoothing=0.4999)[0]
    assert abs(float(a - b)) < 1e-4 * float(a)


def test_simpo_is_eq6_of_meng_2024(seed):
    cw, cl, nw, nl = _pairs()
    beta, gamma = 2.0 + float(torch.rand(())), float(torch.rand(()))
    loss, m = simpo_loss(cw, cl, nw, nl, beta=beta, gamma=gamma)
    rw = [beta / int(nw[i]) * cw.tolist()[i] for i in range(7)]
    rl = [beta / int(nl[i]) * cl.tolist()[i] for i in range(7)]
    _close(loss, _mean([-_log_sigmoid(rw[i] - rl[i] - gamma) for i in range(7)]))
    _close(m["reward_margin"], _mean([rw[i] - rl[i] for i in range(7)]))
    _close(m["reward_accuracy"], _mean([rw[i] > rl[i] for i in range(7)]))
    _close(m["rejected_reward"], _mean(rl))


def test_orpo_is_eq6_of_hong_2024(seed):
    cw, cl, nw, nl = _pairs()
    lam = float(torch.rand(())) + 0.05
    loss, m = orpo_loss(cw, cl, nw, nl, beta=lam)
    want, ratios = [], []
    for i in range(7):
        pw = math.exp(cw.tolist()[i] / int(nw[i]))  # Eq. 4: P(y|x) = exp(mean token log-prob)
        pl = math.exp(cl.tolist()[i] / int(nl[i]))
        log_or = math.log((pw / (1 - pw)) / (pl / (1 - pl)))  # Eq. 5
        l_sft = -cw.tolist()[i] / int(nw[i])
        want.append(l_sft - lam * _log_sigmoid(log_or))  # Eq. 6, 7
        ratios.append(log_or)
    _close(loss, _mean(want))
    _close(m["log_odds_ratio"], _mean(ratios))
    _close(m["nll"], _mean([-cw.tolist()[i] / int(nw[i]) for i in range(7)]))


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo"])
def test_gradients_finite_at_extremes(name):
    """Long answers (sums of -1e4), near-certain ones (mean log-prob -1e-9: ORPO's 1 - P is
    then tiny) and wide margins: finite losses and gradients."""
    cw = torch.tensor([-1e4, -1e-9, -3.0, -50.0], dtype=torch.float32, requires_grad=True)
    cl = torch.tensor([-1e-9, -1e4, -3.0, -0.5], dtype=torch.float32, requires_grad=True)
    tokens = torch.tensor([400, 1, 3, 1])
    logp = torch.stack([cw, cl], 1).reshape(-1)
    counts = torch.stack([tokens, tokens], 1).reshape(-1)
    ref = torch.zeros(8) if name == "dpo" else None
    loss, metrics = preference_loss(name, logp, counts, ref)
    grads = torch.autograd.grad(loss, [cw, cl])
    assert torch.isfinite(loss.detach()) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_preference_loss_splits_chosen_and_rejected_alternating(seed):
    cw, cl, nw, nl = _pairs(5)
    logp = torch.stack([cw, cl], 1).reshape(-1)
    counts = torch.stack([nw, nl], 1).reshape(-1)
    want = simpo_loss(cw, cl, nw, nl, beta=2.0, gamma=0.3)[0]
    assert float(preference_loss("simpo", logp, counts, beta=2.0, gamma=0.3)[0].detach()) == float(want.detach())


@pytest.mark.parametrize("call,arg", [
    (lambda a, n: dpo_loss(a, a, a, a, beta=0), "beta"),
    (lambda a, n: dpo_loss(a, a, a, a, label_smoothing=0.5), "label_smoothing"),
    (lambda a, n: dpo_loss(a, a[:2], a, a), "chosen_logp, rejected_logp"),
    (lambda a, n: simpo_loss(a, a, n, n, gamma=-1), "gamma"),
    (lambda a, n: simpo_loss(a, a, n * 0, n), "chosen_tokens"),
    (lambda a, n: orpo_loss(a, a, n, n.float()[None]), "rejected_tokens"),
    (lambda a, n: preference_loss("kto", a, n), "loss"),
    (lambda a, n: preference_loss("dpo", a, n), "ref_logp"),
    (lambda a, n: preference_loss("dpo", a[:3], n), "logp"),
    (lambda a, n: preference_loss("orpo", a, n[:2]), "token_count"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(ValueError, match=f"^{arg}"):
        call(-torch.rand(4), torch.full((4,), 3))
