"""Chat templates: the Jinja template that turns a list of messages into one prompt, read from the
`chat_template` field of a Hugging Face `tokenizer_config.json` (or a template file given directly)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

TOKENIZER_CONFIG = "tokenizer_config.json"

ChatTemplate = Callable[[list[dict]], str]


def load_chat_template(path: str | Path | None) -> ChatTemplate | None:
    """The template at `path`: a directory with a tokenizer_config.json holding `chat_template`, that json
    file, or a Jinja template file. None when a directory has none (chat completions are then refused)."""
    if path is None:
        return None
    path = Path(path)
    config_path = path / TOKENIZER_CONFIG if path.is_dir() else path
    if path.is_dir() and not config_path.is_file():
        return None
    if config_path.suffix != ".json":
        return compile_template(config_path.read_text(encoding="utf-8"), {})
    config = json.loads(config_path.read_text(encoding="utf-8"))
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the "default" one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source:
        return None
    tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    return compile_template(source, tokens)


def compile_template(source: str, special_tokens: dict) -> ChatTemplate:
    """A function messages -> prompt text, rendering `source` in Jinja's sandbox (templates come with
    downloaded checkpoints: they must not reach Python objects) with add_generation_prompt=True."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(source)

    def render(messages: list[dict]) -> str:
        """The prompt text; ValueError when the template refuses the messages."""
        try:
            return template.render(messages=messages, add_generation_prompt=True, **special_tokens)
        except TemplateError as e:
            raise ValueError(str(e)) from None

    return render


def _token_text(token) -> str:
    # tokenizer_config.json spells special tokens as a string or as {"content": ...}.
    return token.get("content", "") if isinstance(token, dict) else token or ""
