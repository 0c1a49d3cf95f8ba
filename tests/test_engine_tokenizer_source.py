"""An engine provider's tokenizer from a mounted ConfigMap (``tokenizerConfigMap``, which the operator renders
as the ``tokenizerPath`` where it mounts the ConfigMap).

The kubelet lays a ConfigMap volume out as its atomic writer does: the files of one version in a hidden
``..<timestamp>`` directory, a ``..data`` symlink to it, swapped at each update, and each key a symlink
``KEY -> ..data/KEY``. The proxy must read the keys through their symlinks and nothing of the hidden entries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai

from llmgw.engine import EngineTokenizer
from llmgw.providers.engine import _read_directory
from llmgw.server import ProxyServer
from llmgw_dev.fakes import FakeProvider, make_reply
from llmgw_dev.fakes.model import load

MODEL = "demo-model"
MAX_BYTES = 256 * 1024 * 1024
Start = Callable[[dict[str, Any]], Awaitable[ProxyServer]]


def write_config_map_volume(directory: Path, files: dict[str, bytes], timestamp: str) -> None:
    """Write ``files`` into ``directory`` as the kubelet writes a version of a ConfigMap volume."""
    directory.mkdir(parents=True, exist_ok=True)
    version = directory / f"..{timestamp}"
    version.mkdir()
    for name, data in files.items():
        (version / name).write_bytes(data)
    # The kubelet's swap: a new symlink renamed over ..data, so a reader sees one version or the other.
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


def test_a_config_map_volume_is_read_by_its_keys(tmp_path: Path) -> None:
    model = load(MODEL, 20)
    volume = tmp_path / "tokenizer"
    write_config_map_volume(volume, model.files(), "2026_12_03_09_00_00.123456789")
    assert sorted(p.name for p in volume.iterdir() if p.name.startswith("..")) == [
        "..2026_12_03_09_00_00.123456789",
        "..data",
    ]
    files = _read_directory(str(volume), MAX_BYTES)
    assert files == model.files()  # the keys, through their symlinks; none of the hidden entries
    tokenizer = EngineTokenizer.from_files(files)
    assert tokenizer.encode("hello there wörld") == model.encode("hello there wörld")

    # An update: the new version beside the old, ..data swapped; the next read has the new files.
    updated = {**model.files(), "generation_config.json": json.dumps({"temperature": 0.25}).encode()}
    write_config_map_volume(volume, updated, "2026_12_03_09_05_00.987654321")
    assert _read_directory(str(volume), MAX_BYTES) == updated


async def test_a_proxy_serves_with_the_tokenizer_of_a_config_map_volume(
    start_proxy: Start, tmp_path: Path
) -> None:
    model = load(MODEL, 20)
    files = model.files()
    # The ConfigMap's chat template is marked, so the prompt the engine gets shows where it came from (the
    # engine's own, by GetTokenizer, has no mark).
    tokenizer_config = json.loads(files["tokenizer_config.json"])
    tokenizer_config["chat_template"] = "FROM-CONFIGMAP " + tokenizer_config["chat_template"]
    files["tokenizer_config.json"] = json.dumps(tokenizer_config).encode()
    volume = tmp_path / "tokenizers" / "engine"
    write_config_map_volume(volume, files, "2026_12_03_09_00_00.123456789")
    async with FakeProvider("vllm", models=[MODEL]) as engine:
        server = await start_proxy(
            {
                "generation": 1,
                "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
                "shutdown": {"drainSeconds": 1},
                "providers": [
                    {
                        "name": "engine",
                        "vllm": {"target": engine.target, "tokenizerPath": str(volume)},
                        "retries": {"maxAttempts": 1},
                    }
                ],
                "routes": [{"model": MODEL, "grpc": "engine"}],
            }
        )
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="unused", max_retries=0
        )
        try:
            reply = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello there"}]
            )
        finally:
            await client.close()
    assert reply.choices[0].message.content == make_reply("hello there").text
    sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
    assert model.decode(list(sent.tokenized.input_ids)).startswith("FROM-CONFIGMAP")


async def test_a_reload_naming_a_tokenizer_directory_not_mounted_is_refused(
    start_proxy: Start, tmp_path: Path
) -> None:
    """The operator adds tokenizerConfigMap to a running gateway: the running pods see the new config (with
    its tokenizerPath) before the rollout replaces them, and they have no such mount. They keep their config
    instead of failing the provider's requests; the new pods, which have the mount, take it."""
    config: dict[str, Any] = {
        "generation": 1,
        "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "shutdown": {"drainSeconds": 1},
        "providers": [{"name": "engine", "vllm": {"target": "127.0.0.1:9"}}],
        "routes": [{"model": MODEL, "grpc": "engine"}],
    }
    server = await start_proxy(config)
    missing = tmp_path / "tokenizers" / "engine"
    config["generation"] = 2
    config["providers"][0]["vllm"]["tokenizerPath"] = str(missing)
    Path(server.config_path).write_text(json.dumps(config))
    assert not server.reload_if_changed()
    assert server.config.generation == 1

    write_config_map_volume(missing, load(MODEL, 20).files(), "2026_12_03_09_00_00.123456789")
    config["generation"] = 3
    Path(server.config_path).write_text(json.dumps(config))
    assert server.reload_if_changed() and server.config.generation == 3
