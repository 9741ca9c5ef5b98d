"""XGBoost → ONNX, and writing/reading artefacts. Training side only (needs the train extra)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from edgeserve.predictor.model import artefact_paths

#: Name of the ONNX input; the serving side reads it from the model, so this is cosmetic.
INPUT_NAME = "features"


def booster_to_onnx(model: Any, n_features: int) -> bytes:
    """Export a fitted ``xgboost.XGBRegressor`` as an ONNX tree ensemble (one float output)."""
    # onnxmltools ships no type information; imported by name so mypy sees it as Any.
    onnxmltools = importlib.import_module("onnxmltools")
    data_types = importlib.import_module("onnxmltools.convert.common.data_types")

    onnx_model = onnxmltools.convert_xgboost(
        model, initial_types=[(INPUT_NAME, data_types.FloatTensorType([None, n_features]))], target_opset=15
    )
    # Stable bytes for the same trees: no producer timestamps exist in ONNX, but the doc string
    # and graph name are fixed here so a re-export is byte-identical.
    onnx_model.doc_string = ""
    onnx_model.graph.name = "length_predictor"
    return bytes(onnx_model.SerializeToString())


def write_artefact(path: str | Path, onnx_bytes: bytes, meta: dict[str, Any]) -> tuple[Path, Path]:
    onnx_path, json_path = artefact_paths(path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx_path.write_bytes(onnx_bytes)
    json_path.write_text(json.dumps(meta, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return onnx_path, json_path
