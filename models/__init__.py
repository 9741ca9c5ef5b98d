"""Model resolution and the small artefacts edgeserve ships (the length predictor), installed as
``edgeserve.models``."""

from .resolve import ModelEntry, default_model_path, list_models, resolve

__all__ = ["ModelEntry", "default_model_path", "list_models", "resolve"]
