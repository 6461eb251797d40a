"""Preference losses as pure functions of per-answer log-probabilities.

Each takes, per pair, the summed log-probability of the chosen and of the rejected answer's
tokens under the policy (``fastvlm.ops.linear_logprob`` gives them, as [2P] in the order
``fastvlm.data.preference`` lays answers out: chosen 2p, rejected 2p + 1) and what its
formula needs besides: the reference model's sums (DPO) or the answers' token counts (SimPO,
ORPO). Each returns ``(loss, metrics)``: the loss averaged over pairs, and detached scalar
tensors (means over pairs) for logging: ``reward_margin``, ``reward_accuracy`` (the fraction
of pairs whose chosen reward is strictly higher), ``chosen_logp`` / ``rejected_logp`` (the
policy's summed log-probs), ``chosen_reward`` / ``rejected_reward`` (each loss's implicit
reward), and ORPO's ``nll`` and ``log_odds_ratio``.

- ``dpo_loss``: Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7, with the
  conservative-DPO label smoothing (Mitchell 2023, "A note on DPO with noisy preferences";
  TRL's ``label_smoothing``).
- ``simpo_loss``: Meng et al. 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward", Eq. 4 (reward) and Eq. 6 (loss).
- ``orpo_loss``: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
  Reference Model", Eq. 4 (length-normalised likelihood), Eq. 5 (odds), Eq. 6-7 (loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "simpo", "orpo")


def _check_pairs(**tensors) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name}: expected a tensor [pairs], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{', '.join(shapes)}: expected one shape [pairs], got {shapes}")


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return float(value)


def _check_tokens(name: str, tokens: torch.Tensor) -> torch.Tensor:
    if bool((tokens <= 0).any()):
        raise ValueError(f"{name}: every answer needs at least one token, got counts {tokens.tolist()}")
    return tokens


def _metrics(chosen_logp, rejected_logp, chosen_reward, rejected_reward, **extra) -> dict:
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    out = {"reward_margin": (chosen_reward - rejected_reward).mean(),
           "reward_accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype).mean(),
           "chosen_logp": chosen_logp.detach().mean(), "rejected_logp": rejected_logp.detach().mean(),
           "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
    return out | {k: v.detach().mean() for k, v in extra.items()}


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0):
    """Sigmoid DPO (Rafailov et al. 2023, Eq. 7):
    ``-log sigma(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])``;
    with ``label_smoothing`` eps (the preference label flipped with probability eps):
    ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``. Rewards (Eq. 5, up to the
    partition term): ``beta * (log pi(y) - log pi_ref(y))``. At pi = pi_ref the loss is ln 2."""
    _check_pairs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, ref_chosen_logp=ref_chosen_logp,
                 ref_rejected_logp=ref_rejected_logp)
    beta = _check_positive("beta", beta)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a number in [0, 0.5), got {label_smoothing!r}")
    chosen_reward = beta * (chosen_logp - ref_chosen_logp.detach())
    rejected_reward = beta * (rejected_logp - ref_rejected_logp.detach())
    margin = chosen_reward - rejected_reward
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), _metrics(chosen_logp, rejected_logp, chosen_reward, rejected_reward)


def simpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, *, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024): reward ``beta / |y| * log pi(y)`` (Eq. 4, the average
    log-prob), loss ``-log sigma(r(y_w) - r(y_l) - gamma)`` (Eq. 6; gamma the target margin)."""
    _check_pairs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, chosen_tokens=chosen_tokens,
                 rejected_tokens=rejected_tokens)
    beta = _check_positive("beta", beta)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma!r}")
    chosen_reward = beta * chosen_logp / _check_tokens("chosen_tokens", chosen_tokens).to(chosen_logp.dtype)
    rejected_reward = beta * rejected_logp / _check_tokens("rejected_tokens", rejected_tokens).to(rejected_logp.dtype)
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses.mean(), _metrics(chosen_logp, rejected_logp, chosen_reward, rejected_reward)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): expm1 near 0, log1p far.
    (The far branch sees x clamped below -ln 2: where() back-propagates through both branches,
    and log1p(-exp(x)) at x -> 0 would turn the unused one's 0 * inf into NaN.)"""
    ln2 = 0.6931471805599453
    return torch.where(x > -ln2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x.clamp_max(-ln2))))


def orpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, *, beta: float = 0.1):
    """ORPO (Hong et al. 2024): with the length-normalised log-likelihood
    ``l(y) = log pi(y) / |y|`` (Eq. 4) and ``odds(y) = P(y) / (1 - P(y))`` (Eq. 5),
    ``loss = L_SFT + beta * L_OR`` (Eq. 6; the paper's lambda), ``L_SFT = -l(y_w)`` (the chosen
    answer's NLL per token) and ``L_OR = -log sigma(log odds(y_w) - log odds(y_l))`` (Eq. 7).
    Rewards (as TRL logs them): ``beta * l(y)``."""
    _check_pairs(chosen_logp=chosen_logp, rejected_logp=rejected_logp, chosen_tokens=chosen_tokens,
                 rejected_tokens=rejected_tokens)
    beta = _check_positive("beta", beta)
    chosen_avg = chosen_logp / _check_tokens("chosen_tokens", chosen_tokens).to(chosen_logp.dtype)
    rejected_avg = rejected_logp / _check_tokens("rejected_tokens", rejected_tokens).to(rejected_logp.dtype)
    log_odds = (chosen_avg - _log1mexp(chosen_avg)) - (rejected_avg - _log1mexp(rejected_avg))
    nll = -chosen_avg
    losses = nll - beta * F.logsigmoid(log_odds)
    return losses.mean(), _metrics(chosen_logp, rejected_logp, beta * chosen_avg, beta * rejected_avg,
                                   nll=nll, log_odds_ratio=log_odds)


def preference_loss(loss: str, logp: torch.Tensor, token_count: torch.Tensor, ref_logp: torch.Tensor | None = None,
                    **params):
    """The loss named ``loss`` on per-answer tensors [2P] laid out chosen, rejected, chosen, ...
    (``linear_logprob``'s outputs on a ``fastvlm.data.preference`` batch); ``ref_logp`` for DPO;
    ``params`` its hyper-parameters (beta, label_smoothing, gamma)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
    if not isinstance(logp, torch.Tensor) or logp.dim() != 1 or logp.numel() % 2:
        raise ValueError(f"logp: expected a tensor [2 * pairs] (chosen, rejected alternating), got "
                         f"{tuple(logp.shape) if isinstance(logp, torch.Tensor) else type(logp).__name__}")
    if loss == "dpo":
        if ref_logp is None:
            raise ValueError("ref_logp: DPO needs the reference model's log-probs")
        return dpo_loss(logp[0::2], logp[1::2], ref_logp[0::2], ref_logp[1::2], **params)
    if not isinstance(token_count, torch.Tensor) or token_count.shape != logp.shape:
        raise ValueError(f"token_count: expected a tensor of shape {tuple(logp.shape)} (that of logp)")
    fn = simpo_loss if loss == "simpo" else orpo_loss
    return fn(logp[0::2], logp[1::2], token_count[0::2], token_count[1::2], **params)
