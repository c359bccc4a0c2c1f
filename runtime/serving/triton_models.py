"""The Triton Python-backend models of a served export (they run inside Triton's Python stub; torch-free):

- ``Preprocess`` (NAME_pre): encoded image bytes → exactly ``edge-detect``'s preprocessing → uint8 [S, S, 3];
- ``OnnxModel`` (NAME, python flavor): the lean runtime's ONNX Runtime backend, for CPU-only servers;
- ``Postprocess`` (NAME_post): maps and scores → decision score, normalized score, p-value, label and map maximum,
  from the manifest's calibration (``edge-detect``'s own decision code).

``export-engine --triton-repo`` writes the repository; its ``model.py`` files are shims onto these classes. Each
model reads the export's manifest from its own config (parameter ``clipad_manifest``). Triton hands ``execute``
every request its dynamic batcher gathered: they run as one batch, and a bad request fails alone.
"""
from __future__ import annotations

import json
import os

import numpy as np

from ..errors import ClipadError
from ..manifest import Manifest

MANIFEST_PARAMETER = "clipad_manifest"
PRECISION_PARAMETER = "clipad_precision"
BACKEND_PARAMETER = "clipad_backend"
POST_OUTPUTS = ("decision_score", "normalized_score", "p_value", "label", "map_max")


def _pb():
    import triton_python_backend_utils as pb_utils  # only exists inside Triton's Python stub

    return pb_utils


def config_parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def manifest_from_parameters(parameters: dict[str, str], where: str) -> Manifest:
    if MANIFEST_PARAMETER not in parameters:
        raise ClipadError(f"{where}: config.pbtxt has no {MANIFEST_PARAMETER} parameter (not written by "
                          f"export-engine --triton-repo)")
    return Manifest.from_dict(json.loads(parameters[MANIFEST_PARAMETER]), f"{where} {MANIFEST_PARAMETER}")


class _PerRequest:
    """Runs ``compute`` on all requests' inputs at once; on a failure, request by request, so that one bad request
    gets an error response and the others their results."""

    inputs: tuple[str, ...] = ()

    def execute(self, requests):
        pb = _pb()
        arrays = [[pb.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        sizes = [len(a[0]) for a in arrays]
        try:
            merged = [np.concatenate([a[i] for a in arrays]) for i in range(len(self.inputs))]
            outputs = self.compute(*merged)
            responses, start = [], 0
            for n in sizes:
                responses.append(self._response(pb, {k: v[start:start + n] for k, v in outputs.items()}))
                start += n
            return responses
        except Exception:
            return [self._guarded(pb, a) for a in arrays]

    def _guarded(self, pb, inputs):
        try:
            return self._response(pb, self.compute(*inputs))
        except Exception as exc:   # reported to the client as this request's error; the server stays up
            return pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc).splitlines()[0][:500]))

    @staticmethod
    def _response(pb, outputs: dict[str, np.ndarray]):
        return pb.InferenceResponse(output_tensors=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in outputs.items()])

    def compute(self, *inputs) -> dict[str, np.ndarray]:
        raise NotImplementedError


class Preprocess(_PerRequest):
    inputs = ("IMAGE",)

    def initialize(self, args):
        self.manifest = manifest_from_parameters(config_parameters(args), args.get("model_name", "pre"))

    def compute(self, encoded) -> dict[str, np.ndarray]:
        from ..preprocess import prepare

        rows = []
        for item in encoded.reshape(-1):
            data = item if isinstance(item, (bytes, bytearray)) else bytes(item)
            rows.append(prepare(data, self.manifest.image_size))
        return {"images": np.stack(rows)}


class OnnxModel(_PerRequest):
    inputs = ("images",)

    def initialize(self, args):
        from ..detector import Detector

        folder = os.path.join(args["model_repository"], args["model_version"])
        parameters = config_parameters(args)
        threads = int(parameters.get("threads") or 0) or None
        self.detector = Detector.open(folder, backend="onnxruntime", precision=parameters.get(PRECISION_PARAMETER),
                                      threads=threads, providers=["CPUExecutionProvider"])

    def compute(self, images) -> dict[str, np.ndarray]:
        maps, scores = self.detector.run(np.ascontiguousarray(images))
        return {"anomaly_map": maps, "image_score": scores}

    def finalize(self):
        self.detector.close()


class Postprocess(_PerRequest):
    inputs = ("anomaly_map", "image_score")

    def initialize(self, args):
        parameters = config_parameters(args)
        self.decider = ServedDecisions(manifest_from_parameters(parameters, args.get("model_name", "post")),
                                       parameters.get(PRECISION_PARAMETER) or None,
                                       parameters.get(BACKEND_PARAMETER) or "onnxruntime")

    def compute(self, maps, scores) -> dict[str, np.ndarray]:
        return self.decider.decide(maps, scores)


class ServedDecisions:
    """``edge-detect``'s decision policy for every class of a batch of model outputs, as arrays [B, K]."""

    def __init__(self, manifest: Manifest, precision: str | None, backend: str):
        from .. import precisions
        from ..policy import DecisionPolicy

        self.class_names = list(manifest.class_names)
        self.policy = DecisionPolicy(manifest, precision or precisions.REFERENCE.name, backend)

    def decide(self, maps: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
        b, k = scores.shape
        out = {n: np.full((b, k), np.nan, np.float32) for n in POST_OUTPUTS if n != "label"}
        labels = np.empty((b, k), dtype=object)
        for i in range(b):
            for j, name in enumerate(self.class_names[:k]):
                d = self.policy.decide(name, maps[i, j], float(scores[i, j]))
                values = {"decision_score": d.decision_score, "normalized_score": d.normalized_score,
                          "p_value": d.p_value, "map_max": float(np.max(maps[i, j]))}
                for field, value in values.items():
                    out[field][i, j] = np.nan if value is None else value
                labels[i, j] = (d.label or "").encode()
        out["label"] = labels
        return out
