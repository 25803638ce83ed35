"""tritonclient (a real client no one here wrote) through the gateway: routing by model,
API-key auth sent as a header, and the gateway's own statuses."""

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import GATEWAY_KEY, preprocess_fashion

HEADERS = {"x-api-key": GATEWAY_KEY}


@pytest.fixture(scope="module")
def client(gateway):
    c = grpcclient.InferenceServerClient(url=gateway.grpc_addr)
    yield c
    c.close()


def test_liveness_is_open_and_the_gateway_names_itself(client):
    assert client.is_server_live()
    assert client.get_server_metadata(headers=HEADERS).name == "marquee-gateway"


def test_model_metadata_and_readiness_route_to_the_backend(client):
    assert client.is_model_ready("fashion_cnn", headers=HEADERS)
    assert not client.is_model_ready("nope", headers=HEADERS)
    meta = client.get_model_metadata("fashion_cnn", headers=HEADERS)
    assert meta.inputs[0].shape == [-1, 1, 28, 28]


def test_infer_through_the_gateway_matches_the_labels(client, fashion_test_set):
    images, labels = fashion_test_set
    x = preprocess_fashion(images[:32])
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("logits")
    result = client.infer("fashion_cnn", [inp], outputs=[out], headers=HEADERS)
    logits = result.as_numpy("logits")
    assert logits.shape == (32, 10)
    accuracy = float((logits.argmax(axis=1) == labels[:32]).mean())
    assert accuracy >= 0.8, accuracy


def test_calls_without_a_key_are_unauthenticated(client, fashion_test_set):
    images, _ = fashion_test_set
    x = preprocess_fashion(images[:1])
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as ei:
        client.infer("fashion_cnn", [inp])
    assert "UNAUTHENTICATED" in str(ei.value.status()), ei.value
    with pytest.raises(InferenceServerException) as ei:
        client.infer("fashion_cnn", [inp], headers={"x-api-key": "wrong"})
    assert "invalid API key" in ei.value.message()
