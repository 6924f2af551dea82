"""Regenerate the Python stubs (and their .pyi) of proto/opmas/v1 into opmas/v1.

Beside them goes opmas/v1/agents.binpb, a FileDescriptorSet with the proto's comments
(generated Python keeps no source info): the OpenAPI document takes its descriptions from
it, and with its imports included it also serves `grpcurl -protoset` and other tools.

Run as `python scripts/gen_proto.py [OUTPUT_ROOT]`; the default root is the checkout, so the
committed stubs are rewritten in place. tests/unit/test_proto_stubs.py generates into a
temporary root and fails on any difference from the committed files.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc_tools
from google.api import annotations_pb2  # googleapis-common-protos ships the .proto beside it
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
# Relative to the output root; shipped as package data of opmas.v1 (pyproject.toml).
DESCRIPTOR_SET = Path("opmas") / "v1" / "agents.binpb"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "opmas" / "v1").glob("*.proto"))


def generate(out_root: Path) -> None:
    (out_root / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    # protoc finds the mypy-protobuf plugins (protoc-gen-mypy*) on PATH, beside this Python.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    googleapis_include = Path(annotations_pb2.__file__).resolve().parent.parent.parent
    well_known_include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{googleapis_include}",
        f"-I{well_known_include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        "--include_source_info",
        "--include_imports",
        f"--descriptor_set_out={out_root / DESCRIPTOR_SET}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
