"""Output-length prediction for shortest-job-first admission.

    from edgeserve.predictor import LengthPredictor
    predictor = LengthPredictor.load()                      # the shipped artefact
    p = predictor.predict([{"role": "user", "content": "Write a 2000-word essay on tides"}])
    p.expected_tokens, p.length_class                       # order requests by p.score

Serving needs only numpy and onnxruntime; training and adaptation need the ``train`` extra.
"""

from edgeserve.predictor.adapt import AdaptationLog
from edgeserve.predictor.features import FEATURE_SPEC_VERSION, FeatureSpec, feature_row, featurize
from edgeserve.predictor.model import Calibration, LengthClass, LengthPredictor, Prediction
from edgeserve.predictor.request import PredictorInput, Request, to_request

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
