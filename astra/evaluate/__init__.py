"""Evaluation: metrics (scikit-learn/scipy) and task-specific evaluators."""
