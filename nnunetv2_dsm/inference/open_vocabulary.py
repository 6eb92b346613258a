"""Extra prediction channels: masks for free-text prompts (open vocabulary, Eq. 20) and the anomaly map (Eq. 14).

An inference head of ``network.output.PredictionNetwork``, so nnU-Net's own predictor (sliding window, Gaussian
weighting, mirroring, fold averaging) computes them alongside the 45 class channels:

* prompt p (a CLIP text embedding t_p): the prompt joins the 45 class prompts in Eq. 20's softmax, so it competes
  with them ("pancreas tumor" vs "Pancreas"); its mask is the mixture of the final masks (logits) of the trained
  queries that claim it most (weights w_jp = p_j(p) / Σ_i p_i(p) over the queries of classes the model was trained on);
* anomaly (Eq. 14): −max over the trained organ queries' final full-resolution tissue logits — high where no organ
  query responds.

It also records, per prompt, how much each query claimed it and their cosine similarity, averaged over every
forward pass of the case (sliding-window tiles and mirrorings), to report which query answered each prompt.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from nnunetv2_dsm.labels import CLASS_NAMES, NUM_ORGANS
from nnunetv2_dsm.network.alignment import mix_logits
from nnunetv2_dsm.network.anomaly import anomaly_score
from nnunetv2_dsm.network.output import DSMOutput


def anomaly_map(logits: torch.Tensor, trained: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Eq. 14 at full resolution: the final mask logits (B, 45, *S), whose organ channels are organ tissue trained
    without the tumors (training/loss.py: organ_targets_without_tumors), → (B, 1, *S) = −max over the organs the
    model was trained on (``trained`` (45,) bool, the network's ``trained_classes``; None: all 25). The label
    table's organ regions include their tumors and would answer "organ" exactly inside them: they are composed
    after this (network.output.label_table_logits)."""
    organs = None if trained is None else trained[:NUM_ORGANS]
    return anomaly_score(logits[:, :NUM_ORGANS].float(), organs)[:, None]


class OpenVocabularyOutputs:
    """Inference head (``network.output.InferenceHead``): ``head(network, output) -> (B, P + A, *S)`` — P prompt mask
    logits, then the anomaly map if ``anomaly`` (A = 1)."""

    def __init__(self, prompt_embeddings: Optional[torch.Tensor] = None, anomaly: bool = False):
        self.prompt_embeddings = prompt_embeddings
        self.anomaly = anomaly
        self.reset_stats()

    @property
    def num_prompts(self) -> int:
        return 0 if self.prompt_embeddings is None else int(self.prompt_embeddings.shape[0])

    @property
    def num_channels(self) -> int:
        return self.num_prompts + int(self.anomaly)

    def reset_stats(self) -> None:
        self._weight_sum: Optional[torch.Tensor] = None  # (P, N) summed mixing weights
        self._cos_sum: Optional[torch.Tensor] = None     # (P, N) summed cosines
        self._count = 0

    def __call__(self, network, output: DSMOutput) -> torch.Tensor:
        extra: List[torch.Tensor] = []
        if self.num_prompts:
            if network.stage != 2:
                raise RuntimeError("free-text prompts need a Stage 2 model (nnUNetTrainerDSMStage2): Stage 1 has no "
                                   "tumor queries and no CLIP alignment")
            extra.append(self._prompt_logits(network, output))
        if self.anomaly:
            extra.append(anomaly_map(output.logits, network.trained_classes))
        return torch.cat(extra, 1)

    def _prompt_logits(self, network, output: DSMOutput):
        queries = output.queries
        weights, cos = network.alignment.prompt_weights(queries, self.prompt_embeddings,
                                                        eligible=network.trained_classes)   # (B, N, P) each
        logits = mix_logits(weights, output.logits[:, :queries.shape[1]])
        ws, cs = weights.float().sum(0).T, cos.sum(0).T             # (P, N)
        self._weight_sum = ws if self._weight_sum is None else self._weight_sum + ws
        self._cos_sum = cs if self._cos_sum is None else self._cos_sum + cs
        self._count += queries.shape[0]
        return logits

    def prompt_report(self, prompts: Sequence[str]) -> List[Dict]:
        """Per prompt: the query that claimed it most (named by its class slot), its mean mixing weight and mean
        cosine similarity to the prompt, averaged over the forward passes since the last reset."""
        if self._weight_sum is None:
            return []
        report = []
        for p, text in enumerate(prompts):
            w, c = self._weight_sum[p] / self._count, self._cos_sum[p] / self._count
            j = int(w.argmax())
            report.append({"prompt": text, "query": CLASS_NAMES[j], "query_index": j + 1,
                           "weight": round(float(w[j]), 4), "similarity": round(float(c[j]), 4),
                           "top_queries": [{"query": CLASS_NAMES[int(k)], "weight": round(float(w[k]), 4)}
                                           for k in w.argsort(descending=True)[:3]]})
        return report
