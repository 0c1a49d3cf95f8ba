"""A model's tokenizer, built from the files an inference engine hands out, and the archive they come in.

An engine that speaks token ids (vLLM's and SGLang's gRPC servers) leaves text to its client: the client
needs the same tokenizer files the engine loaded. They come from the engine's ``GetTokenizer`` call as one
ZIP archive with its SHA-256 (:func:`read_tokenizer_archive`), the way a model repository holds them:

* ``tokenizer.json``: the ``tokenizers`` library's whole pipeline (vocabulary, merges, added tokens);
* ``tokenizer_config.json``: ``bos_token``/``eos_token`` (a string, or an AddedToken dict with
  ``content``), and usually the chat template(s) (a string, or a list of ``{"name", "template"}``);
* ``chat_template.jinja``: the chat template as a file of its own (newer repositories; it wins over the
  config's default template, as in transformers);
* ``special_tokens_map.json`` (older repositories): bos/eos when the config does not name them;
* ``generation_config.json``: ``eos_token_id`` (an int or a list), the extra ids that end a generation
  (Llama 3 ends on ``<|eot_id|>`` and ``<|eom_id|>`` as well as ``<|end_of_text|>``).

:class:`EngineTokenizer` holds what the text pipeline needs from them; it never adds special tokens to
encoded text unless asked, since the chat template already wrote them. Such text is encoded by tiktoken,
several times faster, when it can express the tokenizer with the same ids (byte-level BPE in GPT-2's,
Llama 3's or Qwen's layout, for instance: :mod:`llmgw.engine._fast_bpe`).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers

from llmgw.engine._fast_bpe import fast_bpe

DEFAULT_TEMPLATE = "default"  # the name transformers gives the template used when none is asked for
TOOL_USE_TEMPLATE = "tool_use"  # the named template transformers picks for a request with tools
_READ_CHUNK = 64 * 1024


class TokenizerError(ValueError):
    """The tokenizer files (or their archive) cannot be used; the message says which file and why."""


class EngineTokenizer:
    """A model's tokenizer: encode and decode, its special tokens, end-of-sequence ids and chat templates."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_templates: Mapping[str, str] | None = None,
        special_tokens_map: Mapping[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        # The special tokens a chat template may name (bos_token, eos_token, pad_token, unk_token...), which
        # transformers gives every template: pass them as its template_kwargs.
        self.special_tokens_map: dict[str, str] = dict(special_tokens_map or {})
        for key, value in (("bos_token", bos_token), ("eos_token", eos_token)):
            if value is not None:
                self.special_tokens_map[key] = value
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        added = tokenizer.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, tok in added.items() if tok.special)
        # The ids of added tokens (special or not: <tool_call>, <think>) are decoded whole by the tokenizer.
        self.added_token_ids: frozenset[int] = frozenset(added)
        eos_ids = set(extra_eos_token_ids)
        if eos_token is not None and (eos_id := tokenizer.token_to_id(eos_token)) is not None:
            eos_ids.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._fast_bpe = fast_bpe(tokenizer.to_str())  # None: not expressible in tiktoken

    @classmethod
    def from_files(cls, files: Mapping[str, bytes]) -> EngineTokenizer:
        """The tokenizer described by a model's files (name → content, see the module's docstring)."""
        if "tokenizer.json" not in files:
            raise TokenizerError(
                f"no tokenizer.json among the tokenizer files ({', '.join(sorted(files)) or 'none'}); "
                "only fast (tokenizers-library) tokenizers are supported"
            )
        try:
            tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise TokenizerError(f"tokenizer.json cannot be loaded: {exc}") from exc
        config = _json_object(files, "tokenizer_config.json")
        special_map = _json_object(files, "special_tokens_map.json")
        generation = _json_object(files, "generation_config.json")
        bos = _token_text(config.get("bos_token", special_map.get("bos_token")), "bos_token")
        eos = _token_text(config.get("eos_token", special_map.get("eos_token")), "eos_token")
        named = {
            key: text
            for key in (
                "bos_token",
                "eos_token",
                "unk_token",
                "pad_token",
                "sep_token",
                "cls_token",
                "mask_token",
            )
            if (text := _token_text(config.get(key, special_map.get(key)), key)) is not None
        }
        templates = _chat_templates(config.get("chat_template"))
        if "chat_template.jinja" in files:
            try:
                templates[DEFAULT_TEMPLATE] = files["chat_template.jinja"].decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TokenizerError(f"chat_template.jinja is not UTF-8: {exc}") from exc
        return cls(
            tokenizer,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=_eos_ids(generation.get("eos_token_id")),
            chat_templates=templates,
            special_tokens_map=named,
        )

    def chat_template(self, name: str | None = None, *, with_tools: bool = False) -> str:
        """The template's source: ``name`` when given, else ``tool_use`` for a request with tools when the
        model has one, else the default (transformers' choice)."""
        if name is None:
            name = (
                TOOL_USE_TEMPLATE
                if with_tools and TOOL_USE_TEMPLATE in self.chat_templates
                else DEFAULT_TEMPLATE
            )
        try:
            return self.chat_templates[name]
        except KeyError:
            known = ", ".join(sorted(self.chat_templates)) or "none"
            raise TokenizerError(
                f"the model has no chat template named {name!r} (it has: {known}); "
                "give one in tokenizer_config.json's chat_template or in chat_template.jinja"
            ) from None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) are recognized."""
        if not add_special_tokens and self._fast_bpe is not None:
            ids = self._fast_bpe.encode(text)
            if ids is not None:
                return ids
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ids outside the vocabulary decode to nothing."""
        return self.tokenizer.decode(
            [i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=skip_special_tokens
        )

    def token_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (``"<|im_end|>"``), or None."""
        return self.tokenizer.token_to_id(token)


def read_tokenizer_archive(
    data: bytes, sha256_hex: str, *, max_bytes: int, max_entries: int = 50
) -> dict[str, bytes]:
    """The files of an engine's tokenizer archive (a ZIP), by base name, after checking it.

    The archive comes from the network: its SHA-256 must be ``sha256_hex``; it may hold at most
    ``max_entries`` entries and ``max_bytes`` bytes once uncompressed, counted while decompressing (a
    ZIP's declared sizes are the sender's word); entry names may not be absolute nor climb with ``..``.
    Files in folders are returned under their base name (an archive of a model folder); two entries with
    one base name are refused, since which of them the engine uses is unknown.
    """
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256_hex.strip().lower():
        raise TokenizerError(
            f"the tokenizer archive's SHA-256 is {digest}, the engine announced {sha256_hex!r}: "
            "it was damaged or cut short in transit"
        )
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise TokenizerError(f"the tokenizer archive is not a readable ZIP file: {exc}") from exc
    with archive:
        entries = archive.infolist()
        if len(entries) > max_entries:
            raise TokenizerError(
                f"the tokenizer archive has {len(entries)} entries, more than the {max_entries} allowed"
            )
        files: dict[str, bytes] = {}
        total = 0
        for entry in entries:
            name = _safe_name(entry.filename)
            if entry.is_dir():
                continue
            base = posixpath.basename(name)
            if base in files:
                raise TokenizerError(f"the tokenizer archive holds two files named {base!r}")
            parts: list[bytes] = []
            try:
                with archive.open(entry) as member:
                    while chunk := member.read(_READ_CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise TokenizerError(
                                f"the tokenizer archive uncompresses to more than {max_bytes} bytes "
                                f"(reached at {entry.filename!r})"
                            )
                        parts.append(chunk)
            except (
                zipfile.BadZipFile,
                OSError,
                ValueError,
                NotImplementedError,
                EOFError,
                RuntimeError,
            ) as exc:
                raise TokenizerError(
                    f"the tokenizer archive's entry {entry.filename!r} is unreadable: {exc}"
                ) from exc
            files[base] = b"".join(parts)
    return files


def _safe_name(name: str) -> str:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or (len(normalized) > 1 and normalized[1] == ":"):
        raise TokenizerError(f"the tokenizer archive has an entry with an absolute path: {name!r}")
    if ".." in normalized.split("/"):
        raise TokenizerError(f"the tokenizer archive has an entry that climbs out with '..': {name!r}")
    return normalized


def _json_object(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{name} holds a JSON {type(value).__name__}, not an object")
    return value


def _token_text(value: Any, key: str) -> str | None:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken dict with ``content``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise TokenizerError(f"tokenizer_config.json's {key} is neither a string nor a token with 'content'")


def _chat_templates(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {DEFAULT_TEMPLATE: value}
    if isinstance(value, list) and all(
        isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
        for item in value
    ):
        return {item["name"]: item["template"] for item in value}
    raise TokenizerError(
        "tokenizer_config.json's chat_template is neither a string nor a list of {name, template}"
    )


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TokenizerError("generation_config.json's eos_token_id is neither an int nor a list of ints")
    return list(values)
