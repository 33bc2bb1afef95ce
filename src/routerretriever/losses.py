"""Contrastive loss from embeddings: pure tensor code, testable without a model."""

from __future__ import annotations

import torch


def contrastive_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    targets: torch.Tensor,
    false_negatives: torch.Tensor | None = None,
    temperature: float = 0.05,
) -> torch.Tensor:
    """InfoNCE of each query against all candidates (in-batch positives plus hard negatives).

    Args:
        queries: ``(B, d)`` query embeddings.
        candidates: ``(C, d)`` document embeddings; row ``targets[i]`` is query ``i``'s positive.
        targets: ``(B,)`` long, the positive's row in ``candidates``.
        false_negatives: ``(B, C)`` bool, True where a candidate is relevant to the query but is
            not its target (another judged-relevant document): masked out, never a negative.
        temperature: softmax temperature (the paper: 0.05).

    Returns:
        The mean cross-entropy, a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = queries @ candidates.T / temperature  # (B, C)
    if false_negatives is not None:
        scores = scores.masked_fill(false_negatives, float("-inf"))
    return torch.nn.functional.cross_entropy(scores, targets)
