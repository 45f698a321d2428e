"""Optional dependencies: require() and the extra each user-reachable import site names.

A missing module is provoked for real by putting ``None`` into ``sys.modules`` (Python then
refuses the import with ``ModuleNotFoundError``, as if it were not installed); the
base-install venv of tests/integration/test_install.py checks the same messages without
the modules at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from headrace.client.errors import CONFIG_ERROR, ConfigError, HeadraceError
from headrace.client.optional import (
    WORKER,
    MissingDependencyError,
    install_command,
    require,
    require_all,
)
from tests.support.onnx_models import add_affine


def block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` fail as if the module were not installed."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_require_returns_the_module() -> None:
    import json

    assert require("json", "dev") is json
    assert require("os.path", "dev") is sys.modules["os.path"]


def test_missing_module_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    block(monkeypatch, "torch")
    with pytest.raises(MissingDependencyError) as ei:
        require("torch", "compress", purpose="headrace compress")
    err = ei.value
    assert isinstance(err, ConfigError) and isinstance(err, HeadraceError)
    assert err.code == CONFIG_ERROR
    assert (err.module, err.extras) == ("torch", ("compress",))
    assert err.install == 'pip install "headrace[compress]"'
    assert str(err).startswith("[config_error] headrace compress needs torch, which is not installed")
    assert str(err).endswith('pip install "headrace[compress]"')
    assert isinstance(err.__cause__, ImportError)


def test_alternative_extras_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    block(monkeypatch, "onnxruntime")
    with pytest.raises(MissingDependencyError) as ei:
        require("onnxruntime", WORKER)
    assert ei.value.install == 'pip install "headrace[worker-cpu]" (or "headrace[worker-gpu]")'
    assert ei.value.extras == ("worker-cpu", "worker-gpu")


def test_missing_parent_of_a_dotted_module_counts_as_not_installed() -> None:
    with pytest.raises(MissingDependencyError, match="not installed") as ei:
        require("headrace_absent_pkg.sub.mod", "ray")
    assert ei.value.module == "headrace_absent_pkg.sub.mod"


def test_installed_but_broken_module_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A module that is there but fails inside (a missing shared library, a missing
    # dependency of its own) must not be reported as simply "not installed".
    (tmp_path / "hr_broken_native.py").write_text("raise ImportError('libfoo.so.1: cannot open shared object file')\n")
    (tmp_path / "hr_broken_dep.py").write_text("import hr_dependency_that_is_gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as ei:
        require("hr_broken_native", "worker-cpu")
    assert "cannot be imported (libfoo.so.1: cannot open shared object file)" in str(ei.value)
    assert ei.value.install in str(ei.value)
    with pytest.raises(MissingDependencyError, match=r"cannot be imported \(No module named 'hr_dependency_that_is_gone'\)"):
        require("hr_broken_dep", "worker-cpu")


def test_require_all_stops_at_the_first_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    block(monkeypatch, "onnx", "onnxruntime")
    with pytest.raises(MissingDependencyError) as ei:
        require_all({"json": "dev", "onnx": "compress", "onnxruntime": WORKER}, purpose="x")
    assert ei.value.module == "onnx" and ei.value.extras == ("compress",)


def test_install_command_needs_an_extra() -> None:
    assert install_command("ray") == 'pip install "headrace[ray]"'
    with pytest.raises(ValueError):
        install_command(())


# --- the sites a user reaches -----------------------------------------------------------


def test_onnx_worker_without_onnxruntime_names_the_worker_extras(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.workers.backends import load_servable
    from headrace.workers.settings import WorkerSettings

    add_affine(tmp_path / "repo")
    block(monkeypatch, "onnxruntime")
    with pytest.raises(MissingDependencyError) as ei:
        load_servable(WorkerSettings(model="tiny", model_repo=str(tmp_path / "repo")))
    assert ei.value.module == "onnxruntime" and ei.value.extras == WORKER


def test_tokenizer_without_tokenizers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.models.tokenizer import load_tokenizer

    block(monkeypatch, "tokenizers")
    with pytest.raises(MissingDependencyError, match=r'headrace\[worker-cpu\]'):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_metrics_without_prometheus_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.workers.metrics import PrometheusMetrics, start_metrics_server

    block(monkeypatch, "prometheus_client")
    with pytest.raises(MissingDependencyError, match=r'headrace\[worker-cpu\]'):
        PrometheusMetrics("m")
    with pytest.raises(MissingDependencyError, match=r'headrace\[worker-cpu\]'):
        start_metrics_server(0)


def test_minilm_builds_name_their_extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.models.builtin.build import ensure_minilm

    block(monkeypatch, "onnx")
    with pytest.raises(MissingDependencyError, match=r'headrace\[compress\]'):
        ensure_minilm(tmp_path / "repo")
    block(monkeypatch, "safetensors")
    with pytest.raises(MissingDependencyError, match=r'headrace\[torch\]'):
        ensure_minilm(tmp_path / "repo", torch_format=True)


def test_bench_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.cluster.bench.plot import plot_throughput_bars

    block(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError, match=r'headrace\[plot\]'):
        plot_throughput_bars({"a": 1.0}, tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(("suffix", "blocked", "extra"), [
    (".onnx", "onnx", "compress"), (".onnx", "onnxruntime", "worker-cpu"), (".pt2", "torch", "torch"),
    (".tflite", "tensorflow", "tf"), (".keras", "tf2onnx", "tf"),
])
def test_model_import_names_the_extra_of_the_source_kind(suffix: str, blocked: str, extra: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.models.importers import ImportOptions, import_source

    src = tmp_path / f"model{suffix}"
    src.write_bytes(b"not read: the check comes first")
    block(monkeypatch, blocked)
    with pytest.raises(MissingDependencyError, match=rf'headrace\[{extra}\]') as ei:
        import_source(src, ImportOptions(), tmp_path / "work")
    assert ei.value.module == blocked


def test_hugging_face_import_needs_compress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.models.importers import ImportOptions, import_source

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    block(monkeypatch, "transformers")
    with pytest.raises(MissingDependencyError, match=r'headrace\[compress\]'):
        import_source(tmp_path / "hf", ImportOptions(), tmp_path / "work")


@pytest.mark.parametrize(("argv", "blocked", "extra"), [
    (["compress", "digits", "--no-bench"], "torch", "compress"),
    (["compress", "digits", "--no-bench"], "onnxruntime", "worker-cpu"),
    (["up", "--no-build"], "ray", "ray"),
    (["scale", "m", "2", "--dashboard", "http://127.0.0.1:9"], "ray", "ray"),
])
def test_cli_commands_name_the_extra(argv: list[str], blocked: str, extra: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from headrace.cluster.cli.main import main

    block(monkeypatch, blocked)
    monkeypatch.setenv("HEADRACE_STATE_DIR", str(tmp_path / "state"))
    res = CliRunner().invoke(main, ["--repo", str(tmp_path / "repo"), *argv])
    assert res.exit_code == 1, res.output
    assert f'pip install "headrace[{extra}]"' in res.output
    assert "[config_error]" in res.output and "Traceback" not in res.output
