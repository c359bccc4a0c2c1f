"""Triton backend: the model runs on a Triton Inference Server (``edge-serve``, or any Triton with a repository
written by ``export-engine --triton-repo``); pre- and post-processing stay local, so records, overlays and
thresholds are ``edge-detect``'s own. The manifest comes from the served model's config."""
from __future__ import annotations

import json
import logging
import time

import numpy as np

from .. import precisions
from ..errors import ClipadError
from ..manifest import Manifest
from .base import Backend

log = logging.getLogger("clipad")
RETRIES = 3            # per request, after the first try
BACKOFF_S = 0.25       # doubles per retry


class TritonBackend(Backend):
    name = "triton"

    @classmethod
    def open(cls, model_dir, manifest, triton_url: str | None = None, triton_model: str | None = None,
             grpc: bool = False) -> "TritonBackend":
        if not triton_url or not triton_model:
            raise ClipadError("the triton backend needs triton_url and triton_model (--triton URL --triton-model NAME)")
        return cls(triton_url, triton_model, grpc=grpc)

    def __init__(self, url: str, model: str, grpc: bool = False, timeout_s: float = 60.0):
        try:
            if grpc:
                import tritonclient.grpc as client
            else:
                import tritonclient.http as client
        except ImportError:
            raise ClipadError("--triton needs the Triton client: pip install 'clipad-edge[client]' "
                              "(tritonclient[http,grpc])") from None
        self.client_module, self.grpc, self.model, self.url = client, grpc, model, url
        self.timeout_s = timeout_s
        target = url.split("://", 1)[-1].rstrip("/")
        try:
            self.client = (client.InferenceServerClient(target) if grpc else
                           client.InferenceServerClient(target, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s))
            ready = self.client.is_server_ready()
        except Exception as exc:   # connection refused, bad URL, DNS: one line
            raise ClipadError(f"--triton {url}: server unreachable ({_first_line(exc)})") from None
        if not ready:
            raise ClipadError(f"--triton {url}: the server is up but not ready")
        try:
            model_ready = self.client.is_model_ready(model)
        except Exception as exc:
            raise ClipadError(f"--triton {url}: cannot ask about model {model!r} ({_first_line(exc)})") from None
        if not model_ready:
            raise ClipadError(f"--triton {url}: model {model!r} is not ready (not in the repository, or it failed to "
                              f"load: see the server log)")
        config = self.client.get_model_config(model)
        config = config.get("config", config) if isinstance(config, dict) else _grpc_config_dict(config)
        self.manifest = self._manifest(config)
        inputs = [(i.get("name"), i.get("data_type")) for i in config.get("input", [])]
        if inputs != [(self.manifest.input.name, "TYPE_UINT8")]:
            raise ClipadError(f"--triton-model {model}: takes {inputs}, not the export's uint8 "
                              f"{self.manifest.input.name!r} images; name the model itself, not its _pre, _post or "
                              f"_pipeline")
        self.precision = config.get("parameters", {}).get("clipad_precision", {}).get("string_value") \
            or precisions.REFERENCE.name
        self.served_by = config.get("backend") or config.get("platform") or "?"
        self._range = (1, max(1, int(config.get("max_batch_size", 1) or 1)))
        self.image_size = self.manifest.image_size

    def _manifest(self, config: dict) -> Manifest:
        text = config.get("parameters", {}).get("clipad_manifest", {}).get("string_value")
        if not text:
            raise ClipadError(f"--triton-model {self.model}: its config has no clipad_manifest parameter (not a model "
                              f"written by export-engine --triton-repo; serve the model itself, not _pre/_post)")
        return Manifest.from_dict(json.loads(text), f"{self.model} config")

    @property
    def description(self) -> str:
        return f"triton {self.model} at {self.url} ({'gRPC' if self.grpc else 'HTTP'}, {self.served_by})"

    @property
    def batch_range(self) -> tuple[int, int]:
        return self._range

    def _infer(self, batch_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.client_module
        tensor = c.InferInput(self.manifest.input.name, list(batch_u8.shape), "UINT8")
        tensor.set_data_from_numpy(batch_u8)
        outputs = [c.InferRequestedOutput("anomaly_map"), c.InferRequestedOutput("image_score")]
        delay = BACKOFF_S
        for attempt in range(RETRIES + 1):
            try:
                result = self.client.infer(self.model, [tensor], outputs=outputs,
                                           **({"client_timeout": self.timeout_s} if self.grpc else {}))
                return result.as_numpy("anomaly_map"), result.as_numpy("image_score")
            except Exception as exc:   # the client raises InferenceServerException and transport errors
                if attempt == RETRIES or _refused(exc):
                    raise ClipadError(f"triton: request failed after {attempt + 1} tries ({_first_line(exc)})") \
                        from None
                log.warning("triton: request failed (%s); retrying in %.2f s", _first_line(exc), delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _release(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def _grpc_config_dict(response) -> dict:
    from google.protobuf.json_format import MessageToDict

    config = MessageToDict(response.config, preserving_proto_field_name=True)
    return config


def _refused(exc: BaseException) -> bool:
    """The server answered that this request is wrong: trying again cannot help."""
    text = str(exc)
    return text.startswith("[400]") or "INVALID_ARGUMENT" in text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
