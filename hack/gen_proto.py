"""Generate the Python code for proto/ into proxy_image/ (or another folder).

`make proto` runs this; tests/test_proto.py runs it into a temporary folder and fails when the
committed files differ, so the committed code can never drift from the .proto.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTOS = ["llmgateway/v1/llm_service.proto"]
GENERATED = [
    "llmgateway/v1/llm_service_pb2.py",
    "llmgateway/v1/llm_service_pb2.pyi",
    "llmgateway/v1/llm_service_pb2_grpc.py",
]


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc  # dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(PROTO_DIR / p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "proxy_image")
