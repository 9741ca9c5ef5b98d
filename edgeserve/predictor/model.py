"""The serving side: load an artefact, predict one request in tens of microseconds.

An artefact is two files with one stem: ``<stem>.onnx`` (a tree ensemble whose single output is
the predicted ``log1p(output tokens)``) and ``<stem>.json`` (feature spec, calibration, and the
training summary). ``predict`` does no I/O and allocates nothing but its result: the input row is
pre-allocated and ONNX Runtime runs on one thread, because one request is far too small to share.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeserve.errors import InvalidParameterError, ModelNotFoundError
from edgeserve.predictor.features import FEATURE_SPEC_VERSION, FeatureSpec, featurize
from edgeserve.predictor.request import PredictorInput, to_request

LengthClass = Literal["short", "medium", "long"]
SHORT_MAX = 200  # short: fewer output tokens than this
LONG_MIN = 800  # long: at least this many
ARTEFACT_STEM = "length_predictor"


@dataclass(frozen=True, slots=True)
class Prediction:
    """One request's predicted answer length.

    Order requests by ``score`` (or, equivalently, ``expected_tokens``): both are continuous and
    monotone in each other. ``length_class`` is the bucket of ``expected_tokens``, for display and
    coarse policies only.
    """

    #: Model output: predicted log1p(output tokens).
    score: float
    #: Estimated mean output tokens (the back-transformed score times a smearing factor).
    expected_tokens: float
    length_class: LengthClass

    def to_json(self) -> dict[str, Any]:
        return {"expected_tokens": round(self.expected_tokens, 1), "class": self.length_class}


@dataclass(frozen=True)
class Calibration:
    """How a score becomes tokens and a class.

    The class is the bucket of ``expected_tokens`` (short < 200 <= medium < 800 <= long), so the two
    never disagree; the thresholds are those boundaries moved into score space.
    """

    #: Mean of exp(residual) on held-out rows (Duan's smearing): turns exp(mean log) into a mean.
    smearing: float
    #: Score thresholds: short below the first, long at or above the second.
    short_below: float
    long_from: float

    @classmethod
    def from_smearing(cls, smearing: float) -> Calibration:
        # expm1(score) * smearing < 200  <=>  score < log1p(200 / smearing)
        return cls(smearing, math.log1p(SHORT_MAX / smearing), math.log1p(LONG_MIN / smearing))

    def to_json(self) -> dict[str, float]:
        return {"smearing": self.smearing, "short_below": self.short_below, "long_from": self.long_from}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(float(data["smearing"]), float(data["short_below"]), float(data["long_from"]))


class LengthPredictor:
    """Predicts how many tokens a request's answer will have.

    ``predict`` reuses one pre-allocated input row, so one instance serves one thread at a time
    (the engine loop); give other threads their own instance (``load`` is cheap).
    """

    def __init__(self, onnx_bytes: bytes, spec: FeatureSpec, calibration: Calibration, meta: dict[str, Any]) -> None:
        # A core dependency, but heavy: loaded with the first predictor. (Imported by name because
        # onnxruntime ships no type information.)
        ort = importlib.import_module("onnxruntime")

        if spec.version != FEATURE_SPEC_VERSION:
            raise ModelNotFoundError(
                f"length predictor was trained on feature spec v{spec.version}; this edgeserve computes "
                f"v{FEATURE_SPEC_VERSION}: retrain it with `edgeserve predictor train`"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types, mapped here at the boundary
            raise ModelNotFoundError(f"not a loadable length predictor model: {e}") from e
        self.onnx_bytes = onnx_bytes
        self._input = self._session.get_inputs()[0].name
        self._output = [self._session.get_outputs()[0].name]
        self.spec = spec
        self.calibration = calibration
        self.meta = meta
        self._row = np.zeros((1, spec.n_features), dtype=np.float32)
        self._row0 = self._row[0]  # the view featurize writes into, made once
        self._feed = {self._input: self._row}

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None) -> LengthPredictor:
        """Load the shipped artefact, or the one at ``path`` (its ``.onnx``, its ``.json``, or the stem)."""
        if path is None:
            root = resources.files("edgeserve.models")
            onnx_bytes = root.joinpath(f"{ARTEFACT_STEM}.onnx").read_bytes()
            meta = json.loads(root.joinpath(f"{ARTEFACT_STEM}.json").read_text(encoding="utf-8"))
        else:
            onnx_path, json_path = artefact_paths(path)
            if not onnx_path.is_file() or not json_path.is_file():
                raise ModelNotFoundError(f"no length predictor at {onnx_path} (+ {json_path.name})")
            onnx_bytes = onnx_path.read_bytes()
            try:
                meta = json.loads(json_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ModelNotFoundError(f"{json_path} is not JSON: {e}") from e
        try:
            spec = FeatureSpec.from_json(meta["features"])
            calibration = Calibration.from_json(meta["calibration"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelNotFoundError(f"length predictor metadata is incomplete or malformed: {e!r}") from e
        return cls(onnx_bytes, spec, calibration, meta)

    # -- predicting ----------------------------------------------------------------------------

    def predict(self, prompt: PredictorInput) -> Prediction:
        """Predict from a prompt string or chat messages. Raises ``InvalidParameterError`` if empty."""
        featurize(to_request(prompt), self.spec, self._row0)
        score = float(self._session.run(self._output, self._feed)[0][0, 0])
        return self.from_score(score)

    def predict_many(self, prompts: Sequence[PredictorInput]) -> list[Prediction]:
        """Batch form of ``predict`` (one ONNX call); any invalid prompt raises."""
        return [self.from_score(float(s)) for s in self.scores(self.featurize_many(prompts))]

    def featurize_many(self, prompts: Sequence[PredictorInput]) -> npt.NDArray[np.float32]:
        rows = np.zeros((len(prompts), self.spec.n_features), dtype=np.float32)
        for i, prompt in enumerate(prompts):
            featurize(to_request(prompt), self.spec, rows[i])
        return rows

    def scores(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        """Scores of pre-computed feature rows (``(n, spec.n_features)``)."""
        if rows.ndim != 2 or rows.shape[1] != self.spec.n_features:
            raise InvalidParameterError(
                f"feature rows must have shape (n, {self.spec.n_features}), got {rows.shape}", param="features"
            )
        if not len(rows):
            return np.zeros(0, dtype=np.float64)
        out = self._session.run(self._output, {self._input: np.ascontiguousarray(rows, dtype=np.float32)})[0]
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def features(self, prompt: PredictorInput) -> npt.NDArray[np.float32]:
        """A fresh feature row for ``prompt`` (what ``AdaptationLog.record`` stores)."""
        row = np.zeros(self.spec.n_features, dtype=np.float32)
        featurize(to_request(prompt), self.spec, row)
        return row

    def from_score(self, score: float) -> Prediction:
        c = self.calibration
        tokens = max(0.0, math.expm1(score) * c.smearing)
        cls: LengthClass = "short" if score < c.short_below else ("long" if score >= c.long_from else "medium")
        return Prediction(score=score, expected_tokens=tokens, length_class=cls)


def artefact_paths(path: str | Path) -> tuple[Path, Path]:
    """``(x.onnx, x.json)`` for ``x.onnx``, ``x.json`` or ``x``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".onnx", ".json") else p
    return stem.with_name(stem.name + ".onnx"), stem.with_name(stem.name + ".json")
