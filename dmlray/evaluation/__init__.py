"""Retrieval evaluation, Ray-free: exact chunked k-NN (``knn``), the retrieval metrics
(``metrics``), clustering for NMI (``clustering``), embedding a split across ranks
(``embedding``), the one evaluation path (``report``) and its pictures (``plots``, ``pictures``).

Importing this package loads only the neighbour search and metrics (torch and numpy).
"""

from dmlray.evaluation.clustering import kmeans, nmi_score
from dmlray.evaluation.knn import knn
from dmlray.evaluation.metrics import format_table, map_at_r, recall_at_k, retrieval_metrics

__all__ = ["format_table", "kmeans", "knn", "map_at_r", "nmi_score", "recall_at_k", "retrieval_metrics"]
