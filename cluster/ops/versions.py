"""Checking a repository version before a rollout touches a replica (``headrace deploy``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from headrace.client.errors import ConfigError
from headrace.cluster.serve.config import find_model_app


def check_version(cfg: Mapping[str, Any], model: str, version: str) -> str:
    """Load ``version`` of the model as a replica would (repository, checksums, the manifest
    held to the model, the stored example run), in this process, before any replica is
    touched. Returns what was checked (``minilm/2 (onnx)``); a fake app is not checked.

    Raises:
        ModelNotFoundError: the repository has no such version (the message lists the ones it has).
        ConfigError / ModelError / RepositoryError: the version does not load.
    """
    from dataclasses import replace

    from headrace.cluster.serve.app import ModelAppArgs

    app = find_model_app(cfg, model)
    args = ModelAppArgs.from_dict(app.get("args") or {})
    if args.fake:
        return f"{model} (fake {args.fake}: nothing to load)"
    settings = replace(args.worker_settings(), version=str(version), intra_op_threads=1)
    if not Path(settings.model_repo).expanduser().is_dir():
        raise ConfigError(f"cannot check {model}/{version}: the model repository {settings.model_repo} is not on "
                          f"this machine; run deploy where it is, or pass --no-check")
    from headrace.workers.backends import load_servable

    servable = load_servable(settings)
    try:
        described = servable.describe()
    finally:
        servable.close()
    return f"{model}/{servable.version} ({described.get('format') or described.get('backend', '?')})"
