"""Output-length prediction for shortest-job-first admission.

    from edgeserve.predictor import LengthPredictor
    predictor = LengthPredictor.load()                      # the shipped artefact
    p = predictor.predict([{"role": "user", "content": "Write a 2000-word essay on tides"}])
    p.expected_tokens, p.length_class                       # order requests by p.score

Serving needs only numpy and onnxruntime; training and adaptation need the ``train`` extra.
Names load on first use, so importing the CLI (``edgeserve.predictor.cli``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeserve.predictor.adapt import AdaptationLog
    from edgeserve.predictor.features import FEATURE_SPEC_VERSION, FeatureSpec, feature_row, featurize
    from edgeserve.predictor.model import Calibration, LengthClass, LengthPredictor, Prediction
    from edgeserve.predictor.request import PredictorInput, Request, to_request

_HOME = {
    "AdaptationLog": "adapt",
    "FEATURE_SPEC_VERSION": "features",
    "FeatureSpec": "features",
    "feature_row": "features",
    "featurize": "features",
    "Calibration": "model",
    "LengthClass": "model",
    "LengthPredictor": "model",
    "Prediction": "model",
    "PredictorInput": "request",
    "Request": "request",
    "to_request": "request",
}

__all__ = [
    "FEATURE_SPEC_VERSION",
    "AdaptationLog",
    "Calibration",
    "FeatureSpec",
    "LengthClass",
    "LengthPredictor",
    "Prediction",
    "PredictorInput",
    "Request",
    "feature_row",
    "featurize",
    "to_request",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
