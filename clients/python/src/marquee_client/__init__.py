"""Python client for Marquee.

    import marquee_client
    with marquee_client.connect("127.0.0.1:8000", api_key="...") as client:
        for name, score, index in client.classify("coffee.png", top_k=3):
            print(f"{score:.3f}  {name} ({index})")

The raw generated stubs are importable too, e.g.
``marquee_client.marquee.vision.v1.vision_pb2`` and ``vision_pb2_grpc``, and the Open
Inference Protocol's ``marquee_client.inference.grpc_service_pb2``. The OIP stubs are not
imported here: their proto package ``inference`` is the same as tritonclient's, and both in one
process would register the same message names twice.

Errors are ``grpc.RpcError``: ``e.code()`` is a ``grpc.StatusCode``, ``e.details()`` the message.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import grpc

from marquee_client.marquee.vision.v1 import vision_pb2, vision_pb2_grpc

__all__ = ["Client", "Label", "connect", "DEFAULT_ENDPOINT", "DEFAULT_MODEL"]

#: The gateway's default address.
DEFAULT_ENDPOINT = "127.0.0.1:8000"
#: The ImageNet classifier every Marquee install serves.
DEFAULT_MODEL = "efficientnet_lite0"
#: The metadata key the gateway reads the API key from.
API_KEY_HEADER = "x-api-key"

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview]


class Label(NamedTuple):
    """One label of a classification: ``(name, score, index)``."""

    name: str
    score: float
    index: int


class Client:
    """A connection to a Marquee endpoint. Use ``connect()`` to make one; close it when done
    (or use it as a context manager)."""

    def __init__(self, channel: grpc.Channel, api_key: Optional[str] = None, timeout: float = 30.0):
        self._channel = channel
        self._metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        self.timeout = timeout
        #: The generated ``marquee.vision.v1.ImageService`` stub, for the RPCs not wrapped here.
        self.vision = vision_pb2_grpc.ImageServiceStub(channel)

    def classify(
        self,
        image: ImageSource,
        model: str = DEFAULT_MODEL,
        top_k: int = 5,
    ) -> list[Label]:
        """Classifies one encoded image (a path, or the file's bytes); most likely label first."""
        request = vision_pb2.ClassifyRequest(
            model=model,
            image=vision_pb2.ImageInput(encoded=_read(image)),
            top_k=top_k,
        )
        response = self.vision.Classify(request, timeout=self.timeout, metadata=self._metadata)
        return [Label(l.name, l.score, l.index) for l in response.labels]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(
    endpoint: str = DEFAULT_ENDPOINT,
    api_key: Optional[str] = None,
    *,
    timeout: float = 30.0,
) -> Client:
    """Opens a plaintext channel to ``endpoint`` (``host:port``; an ``http://`` prefix is
    accepted). ``api_key`` is sent as ``x-api-key`` metadata on every call; ``timeout`` is each
    call's deadline in seconds."""
    target = endpoint.removeprefix("http://").rstrip("/")
    return Client(grpc.insecure_channel(target), api_key=api_key, timeout=timeout)


def _read(image: ImageSource) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    with open(image, "rb") as f:
        return f.read()
