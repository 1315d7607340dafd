"""Split computing for real: the device encoder (ONNX Runtime), the edge server, the device client,
the end-to-end latency model and the load test.

Each part imports only what it needs: a device that runs :class:`Encoder` and :class:`Client` needs
ONNX Runtime and httpx, not FastAPI; the server needs FastAPI, uvicorn and prometheus_client
(``pip install mtfc[deploy]``); neither imports the training code (pipeline, engine, data).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "export_onnx": "mtfc.deploy.export", "encoder_complexity": "mtfc.deploy.export",
    "benchmark_encoder": "mtfc.deploy.export", "compare_streams": "mtfc.deploy.export",
    "Encoder": "mtfc.deploy.encoder",
    "ServerConfig": "mtfc.deploy.server", "create_app": "mtfc.deploy.server", "serve": "mtfc.deploy.server",
    "uvicorn_config": "mtfc.deploy.server",
    "Client": "mtfc.deploy.client",
    "latency_model": "mtfc.deploy.latency",
    "load_test": "mtfc.deploy.loadtest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mtfc.deploy' has no attribute {name!r}")
