"""Verification: which drafted tokens a sequence keeps, so that its output is distributed
exactly as plain one-token decoding's.

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023). Drafts ``d_1..d_K`` come
from a proposal ``q_j`` (``q_j`` may depend on ``d_<j``); the target model gives ``p_j``, the
distribution plain decoding would sample from after the sequence and ``d_<j`` (after every
sampling stage: temperature, top-k/p, min-p, penalties counting ``d_<j`` as output, bias,
masks). For j = 1..K: accept ``d_j`` with probability ``min(1, p_j(d_j) / q_j(d_j))``; at
the first rejection emit a token from the residual ``norm(max(0, p_j - q_j))`` and stop;
if all K are accepted emit a bonus token from ``p_{K+1}``. Each emitted token is then
distributed as ``p_j``: ``P(x) = q(x) min(1, p(x)/q(x)) + (1 - sum_y min(q(y), p(y))) *
max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y)) = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x)``,
since ``1 - sum_y min(q, p) = sum_y max(0, p - q)``. ``rejection_sample`` is this general form
(a draft model's ``q``).

A deterministic draft (n-gram lookup) is a point mass, ``q_j = δ(d_j)``: the acceptance
probability is ``p_j(d_j)``, and the residual is ``p_j`` with ``d_j`` removed and renormalised.
Drawing ``x_j ~ p_j`` and accepting iff ``x_j == d_j`` realises exactly that: it accepts with
probability ``p_j(d_j)``, and a rejected ``x_j`` is distributed as ``p_j(· | x != d_j)``, the
residual. So the engine samples every drafted row as plain decoding would (the same sampler,
the same per-request generator draws in the same order) and keeps drafts while they equal
the sampled tokens: ``accept_greedy`` serves greedy (argmax) and sampled targets alike, and a
seeded request's tokens are the very ones plain decoding would give it.
"""

from __future__ import annotations

import torch


def accept_greedy(drafts: list[int], targets: list[int]) -> list[int]:
    """The tokens plain decoding would have produced, as far as this step can tell.

    ``targets[j]`` is the token plain decoding chooses after the sequence plus ``drafts[:j]``
    (``len(targets) == len(drafts) + 1``): the argmax, or a draw from ``p_j`` (see the module
    doc: for point-mass drafts this is speculative sampling). Returns the accepted drafts
    followed by the target's token at the first disagreement (or after the last draft):
    1 to ``len(drafts) + 1`` tokens.
    """
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return targets[: accepted + 1]


def rejection_sample(drafts: list[int], target_probs: torch.Tensor, draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> list[int]:
    """Speculative sampling's accepted run for one sequence: 1 to ``len(drafts) + 1`` tokens.

    ``target_probs: [K + 1, vocab]``, ``p_j`` after the sequence and ``drafts[:j]``
    (``cholla.sampling.sampler.probabilities``); ``draft_probs: [K, vocab]``, the proposal
    ``q_j`` each draft was drawn from, or None for point-mass drafts. Accept ``d_j`` with
    probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection draw from
    ``norm(max(0, p_j - q_j))``; after K acceptances draw the bonus token from ``p_K``.
    """
    k = len(drafts)
    if target_probs.shape[0] != k + 1 or (draft_probs is not None and draft_probs.shape[0] != k):
        raise ValueError(f"{k} drafts need {k + 1} target rows and {k} draft rows")
    p = target_probs.float()
    ids = torch.tensor(drafts, dtype=torch.long, device=p.device)
    if draft_probs is None:
        q = torch.zeros(k, p.shape[1], device=p.device).scatter_(1, ids[:, None], 1.0)
    else:
        q = draft_probs.float().to(p.device)
    rows = torch.arange(k, device=p.device)
    ratio = (p[rows, ids] / q[rows, ids]).clamp(max=1.0)  # q(d) > 0: d was drawn from q
    uniforms = torch.rand(k, generator=generator, device=p.device)
    rejected = (uniforms >= ratio).tolist()
    for j in range(k):
        if rejected[j]:
            residual = (p[j] - q[j]).clamp(min=0.0)
            # p == q up to rounding leaves nothing to reject into; p itself is then the residual.
            weights = residual if residual.sum() > 0 else p[j]
            return drafts[:j] + [int(torch.multinomial(weights, 1, generator=generator))]
    return drafts + [int(torch.multinomial(p[k], 1, generator=generator))]
