"""String tensors (docs/protocol.md, dtype ``"string"``): a msgpack array of str with a shape,
decoded into numpy object arrays (what onnxruntime takes and returns). The codec round-trips
every shape, refuses malformed or oversized ones with a stable code, and a worker whose model
returns something that is not a string tensor fails that sample only and goes on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
import pytest

from headrace.client import errors as E
from headrace.client.protocol import (
    DEFAULT_LIMITS,
    Envelope,
    Limits,
    Request,
    decode_request,
    decode_tensor,
    encode_request,
    encode_tensor,
)
from headrace.client.samples import MultiRequest
from headrace.workers.backends.fake import AffineServable
from headrace.workers.engine.worker import StreamWorker
from headrace.workers.settings import WorkerSettings
from headrace.workers.testing.memory_broker import MemoryBroker, MemoryStore
from tests.support.worker import serve_until

AFF = "headrace:{affine}:reply:t"


@pytest.mark.parametrize("value", [
    np.array("setosa"), np.array(["a", "", "ünïcødé 🙂"]), np.array([["x", "y"], ["z", "w"]], dtype=object),
    np.empty((0, 2), dtype=object), np.array(["long" * 1000]),
])
def test_string_tensors_round_trip_as_object_arrays(value: np.ndarray[Any, Any]) -> None:
    wire = encode_tensor(value)
    assert wire["dtype"] == "string" and wire["shape"] == list(value.shape)
    got = decode_tensor(msgpack.unpackb(msgpack.packb(wire)))
    assert got.dtype == object and got.shape == value.shape and got.tolist() == value.tolist()
    req = decode_request(encode_request(Request(Envelope("r1", AFF), inputs={"w": value})))
    assert req.inputs["w"].dtype == object and req.inputs["w"].tolist() == value.tolist()


@pytest.mark.parametrize(("tensor", "error", "code"), [
    ({"dtype": "string", "shape": [2], "data": b"ab"}, E.DecodeError, E.DECODE_ERROR),
    ({"dtype": "string", "shape": [2], "data": ["a", 1]}, E.DecodeError, E.DECODE_ERROR),
    ({"dtype": "string", "shape": [2], "data": ["a", b"b"]}, E.DecodeError, E.DECODE_ERROR),
    ({"dtype": "string", "shape": [2], "data": [["a"], ["b"]]}, E.DecodeError, E.DECODE_ERROR),
    ({"dtype": "string", "shape": [3], "data": ["a", "b"]}, E.InvalidTensorError, E.BAD_SHAPE),
    ({"dtype": "string", "shape": [2**40], "data": []}, E.PayloadTooLargeError, E.PAYLOAD_TOO_LARGE),
    ({"dtype": "string", "shape": [0, 2**63], "data": []}, E.InvalidTensorError, E.BAD_SHAPE),
    ({"dtype": "string", "shape": [1], "data": ["x" * 11]}, E.PayloadTooLargeError, E.PAYLOAD_TOO_LARGE),
    ({"dtype": "String", "shape": [1], "data": ["x"]}, E.InvalidTensorError, E.BAD_DTYPE),
])
def test_malformed_string_tensors_are_refused_with_a_stable_code(tensor: dict[str, Any], error: type[Exception],
                                                                 code: str) -> None:
    limits = Limits(max_text_chars=10, max_elements=1000)
    with pytest.raises(error) as info:
        decode_tensor(msgpack.unpackb(msgpack.packb(tensor)), limits)
    assert getattr(info.value, "code", None) == code


def test_an_object_array_that_is_not_all_str_is_not_encoded() -> None:
    with pytest.raises(E.InvalidTensorError, match="holds a dict") as info:
        encode_tensor(np.array(["a", {"k": 1}], dtype=object))
    assert info.value.code == E.BAD_DTYPE
    with pytest.raises(E.InvalidTensorError, match="not valid UTF-8") as info:
        encode_tensor(np.array(["ok", "\ud800"], dtype=object))  # a lone surrogate
    assert info.value.code == E.BAD_VALUE
    with pytest.raises(E.InvalidTensorError, match="^\\[bad_dtype\\] input 'word': a string tensor holds a NoneType"):
        encode_request(Request(Envelope("r1", AFF), inputs={"word": np.array([None], dtype=object)}))
    with pytest.raises(E.InvalidTensorError, match="input 'word'"):
        MultiRequest(Envelope("r2", AFF), inputs={"word": np.array([["a"], [None]], dtype=object)}).encode()
    assert decode_tensor(encode_tensor(np.array(["a", "b"]))).tolist() == ["a", "b"]  # numpy str arrays too
    assert DEFAULT_LIMITS.max_text_chars >= 10_000


class Labeller(AffineServable):
    """``y`` as the affine model, and a string ``label`` per sample ("big" when x[0] > 2); a
    sample whose x holds 9 gets None for a label (not a string)."""

    def infer_stacked(self, inputs: Mapping[str, np.ndarray[Any, Any]],
                      request_ids: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
        out = super().infer_stacked(inputs, request_ids)
        xs = np.asarray(inputs["x"])
        labels = np.array([None if (row == 9).any() else "big" if row[0] > 2 else "small" for row in xs], dtype=object)
        return {**out, "label": labels}


@pytest.mark.timeout(20)
async def test_string_outputs_are_answered_per_sample_and_a_non_string_output_fails_only_its_sample(
        caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    w = StreamWorker(WorkerSettings(model="affine", max_batch=8, max_wait_ms=20, block_ms=5), Labeller(),
                     MemoryBroker(store, "w"))
    rows = np.array([[0] * 4, [3] * 4, [5] * 4], np.float32)
    with store.lock:
        store.add(MultiRequest(Envelope("many", AFF), inputs={"x": rows}).encode())
        store.add(MultiRequest(Envelope("mixed", AFF), inputs={"x": np.array([[9] * 4, [4] * 4], np.float32)}).encode())
        # a NaN row is refused alone; its entry's other samples run one by one and keep their labels
        store.add(MultiRequest(Envelope("nan", AFF), inputs={"x": np.array([[0] * 4, [np.nan] * 4, [3] * 4],
                                                                          np.float32)}).encode())
        for rid, x in (("one", 4.0), ("bad", 9.0), ("after", 0.0)):
            store.add(encode_request(Request(Envelope(rid, AFF), inputs={"x": np.full(4, x, np.float32)})))
    await serve_until(w, lambda: len(store.results(AFF)) == 6)
    got = {r.request_id: r for r in store.results(AFF)}
    many = got["many"].samples
    assert [str(s.outputs["label"]) for s in many] == ["small", "big", "big"]
    assert all(s.outputs["label"].shape == () and s.outputs["label"].dtype == object for s in many)
    np.testing.assert_array_equal(np.stack([s.outputs["y"] for s in many]), rows * 2 + 1)
    mixed = got["mixed"].samples
    assert mixed[0].code == E.MODEL_ERROR and "label" in mixed[0].message
    assert any("mixed" in r.getMessage() and "'label' cannot be sent" in r.getMessage() for r in caplog.records)
    assert mixed[1].ok and str(mixed[1].outputs["label"]) == "big"
    nan = got["nan"].samples
    assert [s.code for s in nan] == ["", E.BAD_VALUE, ""]
    assert [str(nan[i].outputs["label"]) for i in (0, 2)] == ["small", "big"]
    assert got["one"].ok and str(got["one"].outputs["label"]) == "big"
    assert not got["bad"].ok and got["bad"].code == E.MODEL_ERROR and "label" in got["bad"].message
    assert got["after"].ok and str(got["after"].outputs["label"]) == "small"


def test_the_http_gateway_takes_string_tensors_as_json_strings_and_answers_with_them() -> None:
    import json

    from headrace.client.protocol import Result
    from headrace.cluster.serve.gateway import Gateway
    from headrace.cluster.serve.http_body import parse_body

    labels = np.array([["setosa"], ["virginica"]], dtype=object)
    answer = Gateway._answer("iris", "r1", Result("r1", "ok", {"label": labels, "p": np.ones(2, np.float32)}))
    body = json.loads(json.dumps(answer.content))
    assert body["outputs"]["label"] == {"dtype": "string", "shape": [2, 1], "data": ["setosa", "virginica"]}
    assert body["outputs"]["p"]["dtype"] == "float32"

    call = parse_body(b'{"inputs": {"w": {"dtype": "string", "shape": [2, 1], "data": ["rose", "\\u00e9t\\u00e9"]}}}')
    assert call.inputs is not None
    w = call.inputs["w"]
    assert w.dtype == object and w.shape == (2, 1) and w.tolist() == [["rose"], ["été"]]
    limits = Limits(max_text_chars=4)
    for body, error in ((b'{"inputs": {"w": {"dtype": "string", "shape": [2], "data": ["a", 2]}}}', E.ProtocolError),
                        (b'{"inputs": {"w": {"dtype": "string", "shape": [1], "data": ["abcde"]}}}',
                         E.PayloadTooLargeError),
                        (b'{"inputs": {"w": {"dtype": "string", "shape": [3], "data": ["a"]}}}', E.InvalidTensorError)):
        with pytest.raises(error):
            parse_body(body, limits)


def test_compression_judges_a_string_output_by_label_agreement() -> None:
    from headrace.client.errors import ConfigError
    from headrace.models.compress.fidelity import fidelity_for, infer_kind

    ref = np.array(["setosa", "virginica", "setosa", "versicolor"], dtype=object)
    out = np.array(["setosa", "virginica", "versicolor", "versicolor"], dtype=object)
    assert infer_kind("label", ref) == "classification"
    got = fidelity_for("classification", ref, out, labels=np.array(["setosa", "virginica", "setosa", "setosa"]))
    assert got["agreement"] == got["score"] == 0.75 and got["accuracy"] == 0.5 and got["reference_accuracy"] == 0.75
    with pytest.raises(ConfigError, match="agreement only"):
        fidelity_for("other", ref, out)


def test_the_cli_reads_string_inputs_from_json_and_prints_string_outputs(tmp_path: Any) -> None:
    import json

    from rich.console import Console

    from headrace.client.protocol import Result
    from headrace.cluster.cli.render import load_inputs, result_json, result_table

    path = tmp_path / "in.json"
    path.write_text(json.dumps({"word": {"dtype": "string", "data": ["rose", "lily"], "shape": [2]}}))
    got = load_inputs([str(path)])
    assert got["word"].dtype == object and got["word"].tolist() == ["rose", "lily"]
    path.write_text(json.dumps({"word": {"dtype": "strnig", "data": ["rose"]}}))
    with pytest.raises(E.ProtocolError, match="strnig"):
        load_inputs([str(path)])
    with pytest.raises(E.ProtocolError, match="NAME= names the array of a .npy"):
        load_inputs([f"other={path}"])  # a .json names its arrays itself: other= would be ignored
    label = np.empty((), dtype=object)
    label[()] = "setosa"
    res = Result("r", "ok", {"label": label})
    assert result_json(res)["outputs"]["label"] == {"dtype": "string", "shape": [], "data": "setosa"}
    console = Console(record=True, width=100)
    console.print(result_table(res))
    text = console.export_text()
    assert "[setosa]" in text and "string" in text
