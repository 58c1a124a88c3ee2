"""Frozen-feature evaluation: one public function per protocol.

- ``eval_knn``: weighted kNN (DINO protocol), exact blocked search, banks larger than memory, few-shot.
- ``eval_linear``: many linear heads trained in one pass on cached features, selection on a held-out split of
  train, scikit-learn logistic regression for low-shot.

Benchmark suites over them (datasets x protocols x checkpoints -> table, JSON, plot; `seer eval-suite`) are
``seer.evaluation.suites``, with the features they read cached by ``seer.evaluation.cache``; neither is imported here.
"""

from __future__ import annotations

from seer.evaluation.knn import eval_knn, knn_search, write_json
from seer.evaluation.linear import eval_linear, eval_linear_online

__all__ = ["eval_knn", "eval_linear", "eval_linear_online", "knn_search", "write_json"]
