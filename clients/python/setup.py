"""Builds marquee-client: generates the gRPC stubs from the repository's protos at build time.

The stubs are not committed. ``build_py`` runs ``grpc_tools.protoc`` on ``../../proto`` (or
``$MARQUEE_PROTO_DIR``) into the build tree as subpackages of ``marquee_client``:

    marquee_client.marquee.common.v1.common_pb2
    marquee_client.marquee.vision.v1.vision_pb2, vision_pb2_grpc
    marquee_client.inference.grpc_service_pb2, grpc_service_pb2_grpc

protoc writes absolute imports named after the proto packages (``from marquee.common.v1 import
common_pb2``); they are rewritten to live under ``marquee_client`` so the distribution adds no
top-level ``marquee`` or ``inference`` package that could clash with another one.

Install from the repository root with ``pip install --no-build-isolation ./clients/python``
(the build needs ``../../proto``, so build from this tree, not from an sdist; editable
installs are not supported).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PACKAGE = "marquee_client"
PROTO_FILES = (
    "marquee/common/v1/common.proto",
    "marquee/vision/v1/vision.proto",
    "inference/grpc_service.proto",
)
# Top-level proto package directories whose generated imports are moved under PACKAGE.
PROTO_ROOTS = ("marquee", "inference")


def _proto_dir() -> Path:
    d = Path(os.environ.get("MARQUEE_PROTO_DIR", HERE.parent.parent / "proto")).resolve()
    missing = [f for f in PROTO_FILES if not (d / f).is_file()]
    if missing:
        raise SystemExit(
            f"marquee-client: proto files not found under {d}: {missing}; build from the "
            "repository checkout or set MARQUEE_PROTO_DIR"
        )
    return d


def _relocate_imports(path: Path) -> None:
    """Moves protoc's absolute imports and module names under PACKAGE."""
    roots = "|".join(PROTO_ROOTS)
    text = path.read_text()
    text = re.sub(rf"^(\s*)from ({roots})([. ])", rf"\1from {PACKAGE}.\2\3", text, flags=re.M)
    text = re.sub(rf"^(\s*)import ({roots})\.", rf"\1import {PACKAGE}.\2.", text, flags=re.M)
    # Message classes take their __module__ from this name (pickling, repr).
    text = re.sub(
        rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')(?=(?:{roots})\.)",
        rf"\g<1>{PACKAGE}.",
        text,
    )
    path.write_text(text)


def generate_stubs(out: Path) -> None:
    from grpc_tools import protoc  # build requirement; imported late for a clear error above

    import grpc_tools

    proto_dir = _proto_dir()
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"marquee-client: protoc failed: {' '.join(args)}")
    for root in PROTO_ROOTS:
        for d in [out / root, *(p for p in (out / root).rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()
        for f in (out / root).rglob("*.py*"):
            if f.suffix in (".py", ".pyi"):
                _relocate_imports(f)


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(Path(self.build_lib) / PACKAGE)


setup(cmdclass={"build_py": BuildPyWithStubs})
