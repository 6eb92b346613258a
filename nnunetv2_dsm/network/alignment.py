"""Class prompt alignment with CLIP text embeddings: paper §4.2.3, Eq. 20, and its use for open vocabulary.

Eq. 20: each query j, projected into the text space, gets a distribution over the K class prompts

    p_j(k) = softmax_k( cos(t_k, W q_j) / τ ),  τ = 0.01.

DSM turns that into class masks by letting every class k collect the queries that claim it: the mixing weight of
query j for class k is w_jk = p_j(k) / Σ_i p_i(k) (normalised over queries; the ratio the official code computes,
here from proper softmax probabilities and in log space so it never divides by ~0). Because the query masks are
linear in the query kernels (mask_j = <e(v), κ_j>), the class-k logit map is the mask of the mixed kernel
Σ_j w_jk κ_j: the "cosine-similarity map" the BCE and Dice losses supervise (§4.2.4). With τ = 0.01 a trained
model has w ≈ identity on the classes it saw; a prompt that is not one of the 45 (new text t) gets the mask of
the queries whose embeddings are closest to t — the open-vocabulary path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

TAU = 0.01
TEXT_DIM = 512


def cosine_similarity(query_text_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """cos(t_k, q_j): (B, N, Dt) projected queries, (K, Dt) text embeddings → (B, N, K), in float32."""
    return F.normalize(query_text_embeddings.float(), dim=-1) @ F.normalize(text_embeddings.float(), dim=-1).T


def query_class_log_probs(query_text_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                          tau: float = TAU) -> torch.Tensor:
    """Eq. 20 in log space: (B, N, Dt) projected queries, (K, Dt) text embeddings → log p (B, N, K),
    log_softmax over K of cos(t_k, q_j) / τ."""
    return (cosine_similarity(query_text_embeddings, text_embeddings) / tau).log_softmax(dim=-1)


def class_mixing_weights(log_probs: torch.Tensor) -> torch.Tensor:
    """w_jk = p_j(k) / Σ_i p_i(k): (B, N, K) log-probabilities → (B, N, K) weights summing to 1 over queries."""
    return log_probs.softmax(dim=1)


class ClassPromptAlignment(nn.Module):
    """Projects queries into CLIP's text space and mixes query mask kernels into class mask kernels.

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

    def forward(self, queries: torch.Tensor, kernels: torch.Tensor, biases: torch.Tensor,
                text_embeddings: Optional[torch.Tensor] = None):
        """queries (B, N, D), query mask kernels (B, N, Dm) and biases (B, N) →
        (class kernels (B, K, Dm), class biases (B, K), log p (B, N, K)).
        ``text_embeddings`` (K', Dt) replaces the class prompts (open vocabulary)."""
        text = self.text_embeddings if text_embeddings is None else text_embeddings
        log_p = query_class_log_probs(self.project(queries), text, self.tau)
        w = class_mixing_weights(log_p).to(kernels.dtype)
        return torch.einsum("bnk,bnd->bkd", w, kernels), torch.einsum("bnk,bn->bk", w, biases), log_p
