"""VI-ReID metrics, evaluation protocols and reports."""
from eees_jax.evaluation.metrics import cosine_distance, evaluate, evaluate_features, pairwise_distance

__all__ = ["cosine_distance", "evaluate", "evaluate_features", "pairwise_distance"]
