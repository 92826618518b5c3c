"""Tokenizer: a checkpoint's `tokenizer.json`, encoded, decoded and chat-templated exactly as transformers does.

Contract (checked against `transformers.AutoTokenizer` 5.24 by `tests/test_tokenizer.py`):

* `Tokenizer.from_pretrained(folder)` reads `tokenizer.json` (required, loaded with the `tokenizers`
  library), `tokenizer_config.json` (optional: special tokens, chat template), `special_tokens_map.json`
  and `chat_template.jinja` (optional, as transformers reads them) and `config.json` (optional: only
  `bos_token_id` / `eos_token_id`, used when the tokenizer files do not name those tokens).
* `encode(text)` gives the ids transformers gives. Transformers 5 builds the tokenizer from `tokenizer.json`
  and *ignores* `add_bos_token` / `add_eos_token` in `tokenizer_config.json` whenever `tokenizer.json` exists:
  BOS/EOS are added only if the post-processor in `tokenizer.json` adds them. For the DeepSeek-V3 files
  (ByteLevel post-processor) that means no BOS, whatever `add_bos_token` says. Pass
  `bos_eos_from_config=True` to get the transformers 4 `LlamaTokenizerFast` behaviour instead: BOS exactly
  when `add_bos_token` is true, EOS exactly when `add_eos_token` is true.
* `decode(ids)` is the `tokenizers` decode, as transformers does for BPE tokenizers (it never applies
  `clean_up_tokenization_spaces` to them).
* `apply_chat_template` renders with transformers' sandboxed Jinja setup and the same variables
  (`messages`, `tools`, `documents`, `add_generation_prompt`, the named special tokens, then `**kwargs`),
  so the string is byte-identical; `tokenize=True` encodes it without adding special tokens (the template
  writes its own BOS), like transformers.
* `IncrementalDecoder` streams text token by token without ever emitting half a UTF-8 character; the
  concatenation of everything it returns equals `decode(all_ids)`.

A missing or unreadable file raises `RoutedError` saying which file and what to do; so does a chat
request the template rejects.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _RustTokenizer

from routed.errors import RoutedError

__all__ = ["Tokenizer", "IncrementalDecoder"]

# The named special tokens transformers exposes to chat templates (`special_tokens_map`), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names under which a message's reasoning may arrive; transformers copies it to all of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT_CHAR = "\ufffd"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RoutedError(f"cannot read {what} {path}: {exc}; re-download the checkpoint's {path.name}") from exc
    if not isinstance(data, dict):
        raise RoutedError(f"{what} {path} is not a JSON object; re-download the checkpoint's {path.name}")
    return data


def _token_content(value: Any, key: str, path: Path) -> str | None:
    """A special token as written in tokenizer_config.json: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise RoutedError(f"{path}: `{key}` must be a string or an object with `content`, got {value!r}")


def _added_token(value: str | dict[str, Any]) -> AddedToken:
    """The AddedToken transformers registers for a named special token."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in value}
    return AddedToken(value["content"], **flags)


def _config_token_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
        return value[0]
    return None


class Tokenizer:
    """A Hugging Face fast tokenizer plus its special tokens and chat template; see the module docstring."""

    __slots__ = (
        "_tok",
        "path",
        "bos_token",
        "eos_token",
        "bos_token_id",
        "eos_token_id",
        "special_tokens_map",
        "chat_template",
    )

    def __init__(
        self,
        tokenizer: _RustTokenizer,
        *,
        special_tokens: Mapping[str, str | dict[str, Any]] | None = None,
        chat_template: str | dict[str, str] | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        path: Path | None = None,
    ) -> None:
        """Wrap a loaded `tokenizers.Tokenizer`; `from_pretrained` is the usual way in.

        `special_tokens` maps names (`bos_token`, ...) to a string or an AddedToken dict; like transformers,
        each one is (re-)registered as a special token. `bos_token_id` / `eos_token_id` are fallbacks used
        when the matching token is not named or not in the vocabulary.
        """
        self._tok = tokenizer
        self.path = path
        self.chat_template = chat_template
        self.special_tokens_map: dict[str, str] = {}
        for name, value in (special_tokens or {}).items():
            content = value if isinstance(value, str) else value["content"]
            self.special_tokens_map[name] = content
            self._tok.add_special_tokens([_added_token(value)])

        self.bos_token, self.bos_token_id = self._resolve(self.special_tokens_map.get("bos_token"), bos_token_id)
        self.eos_token, self.eos_token_id = self._resolve(self.special_tokens_map.get("eos_token"), eos_token_id)

    def _resolve(self, token: str | None, fallback_id: int | None) -> tuple[str | None, int | None]:
        token_id = self._tok.token_to_id(token) if token is not None else None
        if token_id is None and fallback_id is not None:
            token_id = fallback_id
            token = self._tok.id_to_token(fallback_id) if token is None else token
        return token, token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, *, bos_eos_from_config: bool = False) -> Tokenizer:
        """Load the tokenizer of the checkpoint folder `path` (see the module docstring for the files read).

        `bos_eos_from_config=True` replaces the post-processor of `tokenizer.json` so that `encode` adds BOS/EOS
        exactly when `add_bos_token` / `add_eos_token` are true in `tokenizer_config.json` (transformers 4
        behaviour); the default follows transformers 5, which uses the post-processor of `tokenizer.json`.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise RoutedError(f"tokenizer folder {folder} does not exist or is not a folder; pass a checkpoint folder")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise RoutedError(
                f"no tokenizer.json in {folder}; download it with the checkpoint "
                "(routed needs the fast-tokenizer file, not only tokenizer.model)"
            )
        try:
            rust = _RustTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise RoutedError(
                f"cannot parse {tokenizer_file}: {exc}; the file is corrupt or truncated, re-download it"
            ) from exc

        config_file = folder / "tokenizer_config.json"
        tok_config = _read_json(config_file, "tokenizer config") if config_file.is_file() else {}

        # Named special tokens, as transformers collects them: the standard names, then any other `*_token`.
        raw_tokens: dict[str, Any] = {}
        for key, value in tok_config.items():
            if key in SPECIAL_TOKEN_NAMES or (key.endswith("_token") and isinstance(value, (str, dict))):
                raw_tokens[key] = value
        map_file = folder / "special_tokens_map.json"
        if map_file.is_file() and "added_tokens_decoder" not in tok_config:
            for key, value in _read_json(map_file, "special tokens map").items():
                if key in SPECIAL_TOKEN_NAMES or (key.endswith("_token") and isinstance(value, (str, dict))):
                    raw_tokens[key] = value  # transformers lets this file override tokenizer_config.json
        ordered = [k for k in SPECIAL_TOKEN_NAMES if k in raw_tokens] + [
            k for k in raw_tokens if k not in SPECIAL_TOKEN_NAMES
        ]
        special_tokens: dict[str, str | dict[str, Any]] = {}
        for key in ordered:
            source = config_file if key in tok_config else map_file
            if _token_content(raw_tokens[key], key, source) is not None:
                special_tokens[key] = raw_tokens[key]

        model_config_file = folder / "config.json"
        model_config = _read_json(model_config_file, "model config") if model_config_file.is_file() else {}

        tokenizer = cls(
            rust,
            special_tokens=special_tokens,
            chat_template=cls._load_chat_template(folder, tok_config.get("chat_template"), config_file),
            bos_token_id=_config_token_id(model_config.get("bos_token_id")),
            eos_token_id=_config_token_id(model_config.get("eos_token_id")),
            path=folder,
        )
        if bos_eos_from_config:
            tokenizer._set_bos_eos(bool(tok_config.get("add_bos_token")), bool(tok_config.get("add_eos_token")))
        return tokenizer

    @staticmethod
    def _load_chat_template(folder: Path, template: Any, config_file: Path) -> str | dict[str, str] | None:
        """The template(s) as transformers picks them: `.jinja` files first, then tokenizer_config.json."""
        templates: dict[str, str] = {}
        if (folder / "chat_template.jinja").is_file():
            templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                templates[file.stem] = file.read_text(encoding="utf-8")
        if templates:
            return templates["default"] if list(templates) == ["default"] else templates
        if template is None or isinstance(template, str):
            return template
        if isinstance(template, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in template):
            return {t["name"]: t["template"] for t in template}
        raise RoutedError(f"{config_file}: `chat_template` must be a string or a list of {{name, template}} objects")

    def _set_bos_eos(self, add_bos: bool, add_eos: bool) -> None:
        """Replace the post-processor like transformers' `update_post_processor`."""
        if add_bos and self.bos_token_id is None:
            raise RoutedError("add_bos_token is true but the tokenizer has no BOS token; set `bos_token`")
        if add_eos and self.eos_token_id is None:
            raise RoutedError("add_eos_token is true but the tokenizer has no EOS token; set `eos_token`")
        bos, eos = self.bos_token, self.eos_token
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = ([(bos, self.bos_token_id)] if add_bos else []) + ([(eos, self.eos_token_id)] if add_eos else [])
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ---------------------------------------------------------------- encode / decode

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised as such."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid or incomplete UTF-8 comes out as U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of the token string `token`, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of `token_id` (byte-level form), or None if out of range."""
        return self._tok.id_to_token(token_id)

    # ---------------------------------------------------------------- chat template

    def get_chat_template(self, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
        """The template source to use, chosen like transformers' `get_chat_template`."""
        if isinstance(self.chat_template, dict):
            if chat_template is not None:
                return self.chat_template.get(chat_template, chat_template)
            if tools is not None and "tool_use" in self.chat_template:
                return self.chat_template["tool_use"]
            if "default" in self.chat_template:
                return self.chat_template["default"]
            raise RoutedError(
                f"the tokenizer in {self.path} has several chat templates and none is `default`; "
                f"pass chat_template= one of {sorted(self.chat_template)}"
            )
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise RoutedError(
                f"the tokenizer in {self.path} has no chat template (no `chat_template` in tokenizer_config.json "
                "and no chat_template.jinja); use a chat/instruct checkpoint or send a plain-text prompt"
            )
        return self.chat_template

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template, as transformers' `apply_chat_template` does.

        `kwargs` become template variables (overriding the special tokens of the same name). With
        `tokenize=True` the ids of the rendered string are returned, without added special tokens.
        `tools` must already be JSON schemas.
        """
        source = self.get_chat_template(chat_template, tools)
        if not isinstance(messages, (list, tuple)) or not messages:
            raise RoutedError("a chat needs at least one message; send a non-empty list of messages")
        chat = [_normalize_message(m) for m in messages]
        chat = _alias_reasoning_fields(_plain_template_data(chat))
        template_kwargs = _plain_template_data({**self.special_tokens_map, **kwargs})
        template = _compile_template(source)
        try:
            rendered = template.render(
                messages=chat,
                tools=_plain_template_data(tools),
                documents=_plain_template_data(documents),
                add_generation_prompt=add_generation_prompt,
                **template_kwargs,
            )
        except (jinja2.TemplateError, TypeError) as exc:
            raise RoutedError(f"the chat template rejected the messages: {exc}; fix the request") from exc
        if tokenize:
            return self.encode(rendered, add_special_tokens=False)
        return rendered


# -------------------------------------------------------------------- chat template machinery


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged (transformers uses it for masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict` as transformers exposes it to templates: a constructor without attribute access."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` as transformers exposes it: rejects underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Not Jinja's tojson, which escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:  # noqa: A002 - the name templates use
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once, in the same sandbox transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise RoutedError(f"the chat template does not compile: {exc}; fix or replace the template") from exc


def _to_dicts(value: Any) -> Any:
    """Message objects (dataclasses, pydantic models) to plain dicts, recursively."""
    if isinstance(value, Mapping):
        return {k: _to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _to_dicts(value.model_dump())
    return value


def _normalize_message(message: Any) -> dict:
    """A message as a dict without its None-valued keys (many templates break on `content: None`)."""
    message = _to_dicts(message)
    if not isinstance(message, dict):
        raise RoutedError(f"each chat message must be an object with `role` and `content`, got {message!r}")
    return {k: v for k, v in message.items() if v is not None}


def _plain_template_data(value: Any) -> Any:
    """Rebuild what the template sees out of plain JSON types; anything else becomes `<TypeName>`."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    if hasattr(value, "item") and callable(value.item) and type(value).__module__ == "numpy":
        return _plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning_fields(chat: list[dict]) -> list[dict]:
    """Copy a message's reasoning to `reasoning_content` and `thinking`, as transformers does."""
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# -------------------------------------------------------------------- streaming


@dataclass(slots=True)
class IncrementalDecoder:
    """Turns one stream of token ids into printable text chunks (one instance per stream).

    Prefix/read offsets as in vLLM and TGI: `ids[prefix:read]` is text already emitted (kept as context),
    `ids[read:]` is pending. A chunk is emitted only when the decoded text grew and does not end in U+FFFD,
    so a multi-byte character split over several tokens is held back until it is complete.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = False
    _ids: list[int] = field(default_factory=list, init=False, repr=False)  # ids from the prefix offset on
    _read: int = field(default=0, init=False, repr=False)  # read offset, relative to `_ids`

    def _texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        emitted = decode(self._ids[: self._read], self.skip_special_tokens) if self._read else ""
        return emitted, decode(self._ids, self.skip_special_tokens)

    def _advance(self) -> None:
        # The ids between the old read offset and now become the new prefix (context for the next decode).
        del self._ids[: self._read]
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete ("" while a character is unfinished)."""
        self._ids.append(token_id)
        emitted, full = self._texts()
        if len(full) > len(emitted) and not full.endswith(_REPLACEMENT_CHAR):
            self._advance()
            return full[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (at the end of the stream), possibly with U+FFFD."""
        emitted, full = self._texts()
        self._advance()
        return full[len(emitted) :]
