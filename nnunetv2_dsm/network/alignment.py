"""Class prompt alignment with CLIP text embeddings: paper §4.2.3, Eq. 20, and its use for open vocabulary.

Eq. 20: each query j, projected into the text space, gets a distribution over the K class prompts

    p_j(k) = softmax_k( cos(t_k, W q_j) / τ ),  τ = 0.01.

The 45 queries are matched to the 45 classes by index (query j is class j's query, as in the paper and the
official code), and the alignment loss trains that match for every query on every case (training/loss.py), so
after training p_j(j) ≈ 1. The class-j mask is query j's own mask: Stage 2 then starts from exactly Stage 1's
organ logits, and a class no training case annotates cannot leak into another class's mask. (An earlier version
mixed all query masks into every class with the weights below; untrained queries, whose projections nothing
supervised, then kept 0.11–0.57 of some classes' weight, and at the start of Stage 2 the random projection
scrambled Stage 1's organs: mean own-query weight 0.026 at step 0.)

Open vocabulary: a free-text prompt t_p joins the class prompts in the softmax; its mask mixes the query masks
that claim it, w_jp = p_j(p) / Σ_i p_i(p) over the *trained* queries only (an untrained query's mask is
unsupervised). The prompt's mask logits are Σ_j w_jp logit_j over the queries' final mask logits (:func:`mix_logits`).

The projection is trained on detached queries: the alignment learns to name the queries, the segmentation losses
shape them (the alignment gradient, 4× the segmentation gradient's norm at the start of Stage 2, otherwise
flooded the Stage 1 decoder and backbone).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

TAU = 0.01
TEXT_DIM = 512


def cosine_similarity(query_text_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """cos(t_k, q_j): (B, N, Dt) projected queries, (K, Dt) text embeddings → (B, N, K), in float32 also under
    autocast (divided by τ = 0.01 next, a half-precision cosine would be off by up to ~0.05 in the logit)."""
    with torch.autocast(device_type=query_text_embeddings.device.type, enabled=False):
        return F.normalize(query_text_embeddings.float(), dim=-1) @ F.normalize(text_embeddings.float(), dim=-1).T


def query_class_log_probs(query_text_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                          tau: float = TAU) -> torch.Tensor:
    """Eq. 20 in log space: (B, N, Dt) projected queries, (K, Dt) text embeddings → log p (B, N, K),
    log_softmax over K of cos(t_k, q_j) / τ."""
    return (cosine_similarity(query_text_embeddings, text_embeddings) / tau).log_softmax(dim=-1)


def class_mixing_weights(log_probs: torch.Tensor, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w_jk = p_j(k) / Σ_i p_i(k): (B, N, K) log-probabilities → (B, N, K) weights summing to 1 over queries.

    ``eligible`` (N,) bool restricts the sum to those queries (the others get weight 0): a query whose class no
    training case annotated has a mask nothing supervised, and must not answer a prompt."""
    if eligible is not None and not bool(eligible.all()):
        keep = eligible.to(log_probs.device).reshape(1, -1, 1)
        log_probs = log_probs.masked_fill(~keep, float("-inf"))
    return log_probs.softmax(dim=1)


def mix_logits(weights: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mixed masks of free-text prompts: weights (B, N, P), the queries' final mask logits (B, N, *S) → (B, P, *S),
    Σ_j w_jp logit_j. For plain query masks this is the mask of the mixed kernel Σ_j w_jp κ_j (the masks are linear
    in the kernels); for the host-gated tumor masks (network/host_gate.py) it mixes the gated masks."""
    w = weights.to(logits.dtype)
    return torch.einsum("bnp,bn...->bp...", w, logits)


class ClassPromptAlignment(nn.Module):
    """Projects queries into CLIP's text space (W of Eq. 20) and scores them against the class prompts.

    ``text_embeddings`` (K, 512) is a buffer: the trainer fills it from the CLIP cache, checkpoints carry it, so
    prediction of the 45 classes needs neither CLIP nor the cache.
    """

    def __init__(self, query_dim: int, num_classes: int, text_dim: int = TEXT_DIM, tau: float = TAU):
        super().__init__()
        self.tau = tau
        self.norm = nn.LayerNorm(query_dim)
        self.proj = nn.Linear(query_dim, text_dim)
        self.register_buffer("text_embeddings", torch.zeros(num_classes, text_dim))

    def set_text_embeddings(self, embeddings: torch.Tensor) -> None:
        if tuple(embeddings.shape) != tuple(self.text_embeddings.shape):
            raise ValueError(f"text embeddings must have shape {tuple(self.text_embeddings.shape)} (one row per "
                             f"class, in class order), got {tuple(embeddings.shape)}")
        self.text_embeddings.copy_(embeddings.to(self.text_embeddings))

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries (B, N, D) → their embeddings in the text space (B, N, Dt) (W q_j of Eq. 20)."""
        return self.proj(self.norm(queries))

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """Eq. 20 for the class prompts: queries (B, N, D) → log p (B, N, K). The queries are detached (see the
        module docstring): only the projection learns from the alignment loss."""
        return query_class_log_probs(self.project(queries.detach()), self.text_embeddings, self.tau)

    def prompt_weights(self, queries: torch.Tensor, prompts: torch.Tensor,
                       eligible: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Open vocabulary: queries (B, N, D), prompt embeddings (P, Dt) → (mixing weights (B, N, P), cosines
        (B, N, P)). The prompts compete with the K class prompts in Eq. 20's softmax; ``eligible`` (N,) bool limits
        the mixing to trained queries."""
        projected = self.project(queries)
        text = torch.cat((self.text_embeddings, prompts.to(self.text_embeddings)))
        log_p = query_class_log_probs(projected, text, self.tau)[..., -prompts.shape[0]:]
        return class_mixing_weights(log_p, eligible), cosine_similarity(projected, prompts)
