"""One source for worker settings: every WorkerSettings field is reachable from the command
line, from its HEADRACE_* variable and from the Ray application args, and each of them
resolves empty values the same way."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import pytest
from click.testing import CliRunner

from headrace.client.config import DEFAULT_REDIS_URL
from headrace.client.errors import ConfigError
from headrace.cluster.serve.app import IngressArgs, ModelAppArgs, build_app, with_absolute_repo
from headrace.cluster.serve.args import APP_WORKER_FIELDS, MODEL_REPO_BASE_ENV
from headrace.workers.cli import parse_args, settings_from_args, worker
from headrace.workers.settings import UNSET, WorkerSettings, infos, live_fields

# Valid non-default values where "default + 1" or "<name>-x" would not be valid.
SAMPLES: dict[str, Any] = {"backend": "torch", "redis_url": "redis://h:1/0", "model_repo": "/srv/models",
                           "preferred_batch": 1, "metrics_port": 9100, "servable": "pkg.mod:Servable",
                           "submit_mode": "direct"}


def sample(name: str, hint: Any, default: Any) -> Any:
    if name in SAMPLES:
        return SAMPLES[name]
    if hint is bool:
        return not default
    if hint is int:
        return default + 1
    if hint is float:
        return default + 0.5
    return f"{name}-x"


def samples() -> dict[str, Any]:
    hints = typing.get_type_hints(WorkerSettings)
    return {f.name: sample(f.name, hints[f.name], f.default) for f, _ in infos()}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("HEADRACE_"):
            monkeypatch.delenv(key)


def test_every_field_is_reachable_from_the_command_line(clean_env: None) -> None:
    values = samples()
    argv: list[str] = []
    for f, info in infos():
        v = values[f.name]
        argv += [f"--{info.flag}" if v is True else f"--no-{info.flag}"] if isinstance(v, bool) else \
            [f"--{info.flag}", str(v)]
    settings = settings_from_args(parse_args(argv))
    assert dataclasses.asdict(settings) == values
    help_text = CliRunner().invoke(worker, ["--help"], terminal_width=400).output
    for _, info in infos():
        assert info.env in help_text and f"--{info.flag}" in help_text


def test_every_field_is_reachable_from_its_environment_variable(clean_env: None) -> None:
    values = samples()
    env = {info.env: str(values[f.name]).lower() if isinstance(values[f.name], bool) else str(values[f.name])
           for f, info in infos()}
    assert dataclasses.asdict(WorkerSettings.from_env(env)) == values


def test_every_field_is_reachable_from_the_ray_application_args(clean_env: None) -> None:
    values = samples()
    direct = {k: v for k, v in values.items() if k in APP_WORKER_FIELDS}
    overrides = {k: v for k, v in values.items() if k not in APP_WORKER_FIELDS and k != "consumer"}
    args = ModelAppArgs.from_dict({**direct, "worker_overrides": overrides})
    assert dataclasses.asdict(args.worker_settings(consumer=values["consumer"])) == values
    assert set(args.user_config()) == set(live_fields()) == {"max_batch", "preferred_batch", "max_wait_ms"}
    rebuilt = ModelAppArgs.from_worker_settings(WorkerSettings(**values))
    assert dataclasses.asdict(rebuilt.worker_settings(consumer=values["consumer"])) == values


def test_the_app_args_take_the_settings_types_defaults_and_validation() -> None:
    fields = {f.name: f for f in dataclasses.fields(ModelAppArgs)}
    hints = typing.get_type_hints(WorkerSettings)
    for f, info in infos():
        if info.app_arg:
            assert fields[f.name].type == hints[f.name]
            assert fields[f.name].default == (f.default if info.app_default is UNSET else info.app_default)
        else:
            assert f.name not in fields
    assert ModelAppArgs().intra_op_threads == 1, "replicas default to one backend thread"
    with pytest.raises(ConfigError, match=r"num_replicas: .*application arg 'num_replicas'") as info:
        ModelAppArgs(num_replicas=0)
    assert "HEADRACE_NUM_REPLICAS" not in info.value.message, "there is no such variable"


def test_an_empty_redis_url_follows_the_environment_then_the_default(clean_env: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    args = ModelAppArgs(model="m", redis_url="")
    assert args.worker_settings().effective_redis_url == DEFAULT_REDIS_URL
    assert IngressArgs().effective_redis_url == DEFAULT_REDIS_URL
    monkeypatch.setenv("HEADRACE_REDIS_URL", "redis://from-env:7/1")
    assert args.worker_settings().effective_redis_url == "redis://from-env:7/1"
    assert IngressArgs().effective_redis_url == "redis://from-env:7/1"
    assert ModelAppArgs(redis_url="redis://given:1/0").worker_settings().redis_url == "redis://given:1/0"
    assert settings_from_args(parse_args([])).effective_redis_url == "redis://from-env:7/1"


def test_a_relative_model_repo_resolves_against_the_documented_base(clean_env: None, tmp_path: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert with_absolute_repo({"model_repo": "repo"})["model_repo"] == str(tmp_path / "repo")
    assert with_absolute_repo({"model_repo": "repo"}, base="/cfg")["model_repo"] == "/cfg/repo"
    assert with_absolute_repo({"model_repo": "/abs/repo"})["model_repo"] == "/abs/repo"
    monkeypatch.setenv(MODEL_REPO_BASE_ENV, "/srv/headrace")
    app = build_app({"model": "m", "fake": "affine", "model_repo": "models"})
    bound = app._bound_deployment.init_args[0]  # type: ignore[attr-defined]
    assert bound["model_repo"] == "/srv/headrace/models"
