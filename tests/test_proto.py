"""The committed generated code matches proto/, and the proto keeps its documented shape."""

from __future__ import annotations

import importlib.util
import pathlib

from llmgateway.v1 import llm_service_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gen_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "hack" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_code_is_fresh(tmp_path: pathlib.Path) -> None:
    gen = _gen_module()
    gen.generate(tmp_path)
    for name in gen.GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "proxy_image" / name).read_text()
        assert fresh == committed, f"proxy_image/{name} is stale: run `make proto` and commit the result"


def test_optional_fields_distinguish_unset_from_zero() -> None:
    req = pb.ChatRequest(model="m")
    assert not req.HasField("temperature")
    req.temperature = 0.0
    assert req.HasField("temperature")
    assert pb.ChatRequest.FromString(req.SerializeToString()).HasField("temperature")


def test_every_rpc_and_field_is_commented() -> None:
    lines = (ROOT / "proto" / "llmgateway" / "v1" / "llm_service.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        declares = stripped.startswith("rpc ") or (
            stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "option"))
        )
        if declares:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"
