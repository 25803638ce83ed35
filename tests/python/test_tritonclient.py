"""End-to-end tests of marquee-vision's Open Inference Protocol endpoint,
driven by NVIDIA's third-party ``tritonclient.grpc`` client."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import FIXTURES, preprocess_fashion, preprocess_imagenet

FASHION = "fashion_cnn"
EFFNET = "efficientnet_lite0"
N_IMAGES = 64
# fashion_cnn's model.toml sets batching.max_batch_size = 32: one request may carry at most
# 32 rows (as in Triton), so the 64 images go in two requests.
MAX_BATCH = 32
COFFEE_CLASS = 967  # ImageNet "espresso"


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(url=server.grpc_addr)
    yield c
    c.close()


@pytest.fixture(scope="module")
def fashion_batch(fashion_test_set):
    images, labels = fashion_test_set
    x = preprocess_fashion(images[:N_IMAGES])
    y = labels[:N_IMAGES].astype(np.int64)
    assert x.shape == (N_IMAGES, 1, 28, 28) and x.dtype == np.float32
    return x, y


def _status(exc: InferenceServerException) -> str:
    return str(exc.status())


def _infer_logits_raw(client, x: np.ndarray) -> np.ndarray:
    """One raw-contents ModelInfer call (x.shape[0] <= MAX_BATCH)."""
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("logits")
    result = client.infer(FASHION, inputs=[inp], outputs=[out])
    logits = result.as_numpy("logits")
    assert logits is not None, "response has no 'logits' output"
    return logits


def _infer_logits_raw_chunked(client, x: np.ndarray) -> np.ndarray:
    parts = [_infer_logits_raw(client, x[i : i + MAX_BATCH]) for i in range(0, len(x), MAX_BATCH)]
    return np.concatenate(parts, axis=0)


# Minimal google.rpc.Status / BadRequest decoding (googleapis-common-protos is not installed),
# to read the structured field violation the server puts in `grpc-status-details-bin`.
def _rpc_status_classes():
    from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    any_fd = descriptor_pb2.FileDescriptorProto()
    any_pb2.DESCRIPTOR.CopyToProto(any_fd)
    pool.Add(any_fd)
    fd = descriptor_pb2.FileDescriptorProto(
        name="marquee_test_rpc.proto", package="google.rpc", syntax="proto3",
        dependency=["google/protobuf/any.proto"],
    )
    F = descriptor_pb2.FieldDescriptorProto
    st = fd.message_type.add(name="Status")
    st.field.add(name="code", number=1, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
    st.field.add(name="message", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    st.field.add(name="details", number=3, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                 type_name=".google.protobuf.Any")
    br = fd.message_type.add(name="BadRequest")
    fv = br.nested_type.add(name="FieldViolation")
    fv.field.add(name="field", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    fv.field.add(name="description", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    br.field.add(name="field_violations", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                 type_name=".google.rpc.BadRequest.FieldViolation")
    pool.Add(fd)
    get = message_factory.GetMessageClass
    return get(pool.FindMessageTypeByName("google.rpc.Status")), get(
        pool.FindMessageTypeByName("google.rpc.BadRequest")
    )


def _raw_infer_error(server, req: service_pb2.ModelInferRequest) -> tuple[grpc.StatusCode, str, list[str]]:
    """Send req with the raw stub; return (code, message, BadRequest field-violation fields)."""
    Status, BadRequest = _rpc_status_classes()
    with grpc.insecure_channel(server.grpc_addr) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req, timeout=30)
    err = ei.value
    fields: list[str] = []
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = Status.FromString(value)
            for d in status.details:
                if d.type_url.endswith("/google.rpc.BadRequest"):
                    fields += [v.field for v in BadRequest.FromString(d.value).field_violations]
    return err.code(), err.details(), fields


def _fashion_request(x: np.ndarray, datatype: str = "FP32") -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=FASHION)
    t = req.inputs.add(name="image", datatype=datatype)
    t.shape.extend(x.shape)
    req.raw_input_contents.append(x.tobytes())
    req.outputs.add(name="logits")
    return req


# ---------------------------------------------------------------------------
# 1-3: health and metadata
# ---------------------------------------------------------------------------


def test_server_live_ready_metadata(client):
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    md = client.get_server_metadata()
    assert md.name == "marquee-vision"


def test_model_ready(client):
    assert client.is_model_ready(FASHION) is True
    assert client.is_model_ready(EFFNET) is True
    assert client.is_model_ready("nope") is False


def test_model_metadata_fashion(client):
    md = client.get_model_metadata(FASHION)
    assert md.name == FASHION
    assert len(md.inputs) == 1
    assert md.inputs[0].name == "image"
    assert md.inputs[0].datatype == "FP32"
    assert list(md.inputs[0].shape) == [-1, 1, 28, 28]
    outputs = {o.name: o for o in md.outputs}
    assert set(outputs) == {"logits", "embedding"}
    assert outputs["logits"].datatype == "FP32"
    assert list(outputs["logits"].shape) == [-1, 10]
    assert outputs["embedding"].datatype == "FP32"
    assert list(outputs["embedding"].shape) == [-1, 128]


def test_model_metadata_unknown_model(client):
    with pytest.raises(InferenceServerException) as ei:
        client.get_model_metadata("nope")
    assert "NOT_FOUND" in _status(ei.value), (_status(ei.value), ei.value.message())


# ---------------------------------------------------------------------------
# 4-5: fashion_cnn inference, raw and typed contents
# ---------------------------------------------------------------------------


def test_fashion_infer_raw_accuracy(client, fashion_batch, server):
    x, y = fashion_batch
    logits = _infer_logits_raw_chunked(client, x)
    assert logits.shape == (N_IMAGES, 10)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    acc = float(np.mean(np.argmax(logits, axis=1) == y))
    assert acc >= 0.8, f"accuracy on first {N_IMAGES} test images: {acc}"
    # Loose sanity check against the accuracy recorded at training time.
    recorded = json.loads((server.model_repo / FASHION / "metrics.json").read_text())
    assert acc >= recorded["test_accuracy"] - 0.1, (acc, recorded)


def test_fashion_infer_batch_over_max_is_rejected(client, fashion_batch):
    x, _ = fashion_batch
    assert x.shape[0] == 2 * MAX_BATCH
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as ei:
        client.infer(FASHION, inputs=[inp], outputs=[grpcclient.InferRequestedOutput("logits")])
    assert "INVALID_ARGUMENT" in _status(ei.value), (_status(ei.value), ei.value.message())
    assert f"at most {MAX_BATCH}" in ei.value.message(), ei.value.message()


def test_fashion_infer_raw_requests_only_logits(client, fashion_batch):
    x, _ = fashion_batch
    inp = grpcclient.InferInput("image", [2, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(x[:2])
    result = client.infer(FASHION, inputs=[inp], outputs=[grpcclient.InferRequestedOutput("logits")])
    resp = result.get_response()
    assert [o.name for o in resp.outputs] == ["logits"]
    assert list(resp.outputs[0].shape) == [2, 10]
    assert resp.outputs[0].datatype == "FP32"
    assert resp.model_name == FASHION
    # Raw input in, raw output back.
    assert len(resp.raw_output_contents) == 1
    assert len(resp.raw_output_contents[0]) == 2 * 10 * 4


def test_fashion_infer_typed_contents_match_raw(server, client, fashion_batch):
    x_all, _ = fashion_batch
    x = x_all[N_IMAGES - MAX_BATCH :]
    n = x.shape[0]
    raw_logits = _infer_logits_raw(client, x)
    assert raw_logits.shape == (n, 10)

    req = service_pb2.ModelInferRequest()
    req.model_name = FASHION
    req.id = "typed-1"
    tensor = req.inputs.add()
    tensor.name = "image"
    tensor.datatype = "FP32"
    tensor.shape.extend(x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    req.outputs.add().name = "logits"

    with grpc.insecure_channel(
        server.grpc_addr,
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    ) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        resp = stub.ModelInfer(req, timeout=60)

    assert resp.model_name == FASHION
    assert resp.id == "typed-1"
    assert len(resp.outputs) == 1
    out = resp.outputs[0]
    assert out.name == "logits"
    assert out.datatype == "FP32"
    assert list(out.shape) == [n, 10]
    # Typed input in, typed output back (no raw contents).
    assert len(resp.raw_output_contents) == 0
    assert len(out.contents.fp32_contents) == n * 10
    typed_logits = np.asarray(out.contents.fp32_contents, dtype=np.float32).reshape(n, 10)
    np.testing.assert_allclose(typed_logits, raw_logits, rtol=0, atol=1e-4)
    assert np.allclose(typed_logits, raw_logits, atol=1e-4)


# ---------------------------------------------------------------------------
# 6: efficientnet_lite0 on a real photo
# ---------------------------------------------------------------------------


def test_efficientnet_coffee(client):
    x = preprocess_imagenet(FIXTURES / "coffee.png")
    assert x.shape == (1, 3, 224, 224)
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(EFFNET, inputs=[inp], outputs=[grpcclient.InferRequestedOutput("logits")])
    logits = result.as_numpy("logits")
    assert logits is not None
    assert logits.shape == (1, 1000)
    assert int(np.argmax(logits[0])) == COFFEE_CLASS, np.argsort(logits[0])[::-1][:5]


# ---------------------------------------------------------------------------
# 7: invalid requests
# ---------------------------------------------------------------------------


def _infer_expect_error(client, inp: grpcclient.InferInput) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as ei:
        client.infer(FASHION, inputs=[inp], outputs=[grpcclient.InferRequestedOutput("logits")])
    return ei.value


def test_bad_shape(client, fashion_batch):
    x, _ = fashion_batch
    bad = np.ascontiguousarray(x[:2, :, :27, :])  # [2,1,27,28]
    inp = grpcclient.InferInput("image", list(bad.shape), "FP32")
    inp.set_data_from_numpy(bad)
    err = _infer_expect_error(client, inp)
    assert "INVALID_ARGUMENT" in _status(err), (_status(err), err.message())
    assert "[2, 1, 27, 28]" in err.message(), err.message()
    # The message must name the offending request field (error.rs: "Messages ... name the
    # field in backticks"); tritonclient users only ever see the message.
    assert "inputs[0].shape" in err.message(), err.message()


def test_bad_shape_field_violation(server, fashion_batch):
    x, _ = fashion_batch
    code, message, fields = _raw_infer_error(server, _fashion_request(np.ascontiguousarray(x[:2, :, :27, :])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert fields == ["inputs[0].shape"], (fields, message)


def test_bad_datatype_fp64(client, server, fashion_batch):
    x, _ = fashion_batch
    bad = x[:2].astype(np.float64)
    inp = grpcclient.InferInput("image", list(bad.shape), "FP64")
    inp.set_data_from_numpy(bad)
    err = _infer_expect_error(client, inp)
    assert "INVALID_ARGUMENT" in _status(err), (_status(err), err.message())
    assert "must be `FP32`, got `FP64`" in err.message(), err.message()
    code, message, fields = _raw_infer_error(server, _fashion_request(bad, "FP64"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert fields == ["inputs[0].datatype"], (fields, message)


def test_nan_input(client, server, fashion_batch):
    x, _ = fashion_batch
    bad = x[:2].copy()
    bad[1, 0, 14, 14] = np.nan
    flat_index = 1 * 28 * 28 + 14 * 28 + 14
    inp = grpcclient.InferInput("image", list(bad.shape), "FP32")
    inp.set_data_from_numpy(bad)
    err = _infer_expect_error(client, inp)
    assert "INVALID_ARGUMENT" in _status(err), (_status(err), err.message())
    assert "NaN" in err.message(), err.message()
    assert f"element {flat_index} is NaN" in err.message(), err.message()
    code, message, fields = _raw_infer_error(server, _fashion_request(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert fields == ["inputs[0]"], (fields, message)


def test_server_alive_after_bad_requests(client, fashion_batch):
    # Runs after the invalid-input tests (file order).
    assert client.is_server_live() is True
    assert client.is_server_ready() is True
    x, _ = fashion_batch
    logits = _infer_logits_raw(client, x[:4])
    assert logits.shape == (4, 10)


# ---------------------------------------------------------------------------
# 8: RPCs outside the implemented subset
# ---------------------------------------------------------------------------


def test_repository_index_lists_every_model(client):
    index = client.get_model_repository_index(as_json=True)
    models = {m["name"]: m for m in index["models"]}
    assert set(models) == {"efficientnet_lite0", FASHION}
    assert models[FASHION]["version"] == "1"
    assert models[FASHION]["state"] == "READY"


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.get_inference_statistics(FASHION), id="ModelStatistics"),
        pytest.param(lambda c: c.get_model_config(FASHION), id="ModelConfig"),
    ],
)
def test_unimplemented_rpc(client, call):
    with pytest.raises(InferenceServerException) as ei:
        call(client)
    assert "UNIMPLEMENTED" in _status(ei.value), (_status(ei.value), ei.value.message())
