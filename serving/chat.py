"""Chat on a completion model: the served folder's chat template (`chat_template` in its
tokenizer_config.json, as Hugging Face and vLLM read it) turns messages into one prompt, which
`serving.engine.Engine` completes; and the tokenizer facts `GET /tokenizer_info` reports.

    template = ChatTemplate.of("artifacts/tiny")       # None: the folder has no chat template
    prompt = template.render([{"role": "user", "content": "Hi"}])

The template is rendered as `transformers` renders it: jinja2's sandbox, `trim_blocks` and
`lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
and a `raise_exception(message)` function (a template's own refusal becomes a 400).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from attnlm.tokenizer import EOT_TOKEN
from serving.params import EngineError, invalid

CONFIG_FILE = "tokenizer_config.json"


def tokenizer_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The folder's tokenizer_config.json, or {} without one (or an unreadable one)."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def chat_template_text(config: dict[str, Any]) -> str | None:
    """`chat_template` of a tokenizer config: a string, or the "default" of a list of named
    templates (Hugging Face's two forms); None without one."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def no_chat_template(model_name: str) -> EngineError:
    return EngineError(
        f"the model {model_name!r} has no chat template (no `chat_template` in its "
        f"{CONFIG_FILE}): send the prompt as text to POST /v1/completions instead",
        param="messages",
        code="chat_template_missing",
        status=404,
    )


def message_text(content: str | list) -> str:
    """A message's content: a text, or its text parts ({"type": "text", "text": ...}) joined by
    newlines (as vLLM joins them)."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] if isinstance(part, dict) else part.text for part in content)


class ChatTemplate:
    """A jinja2 chat template, compiled once."""

    def __init__(self, source: str, bos_token: str = EOT_TOKEN, eos_token: str = EOT_TOKEN):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.source = source
        self.template = env.from_string(source)
        self.special = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def of(cls, folder: str | os.PathLike) -> ChatTemplate | None:
        """The folder's chat template, or None without one; ValueError for one that is not
        valid jinja2 (named, at load: a server should not start with it)."""
        from jinja2 import TemplateSyntaxError

        config = tokenizer_config(folder)
        source = chat_template_text(config)
        if source is None:
            return None
        special = {
            k: config[k] for k in ("bos_token", "eos_token") if isinstance(config.get(k), str)
        }
        try:
            return cls(source, **special)
        except TemplateSyntaxError as err:
            raise ValueError(f"{Path(folder) / CONFIG_FILE}: chat_template: {err}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt of `messages` ({"role", "content"}, content a text or text parts)."""
        from jinja2 import TemplateError

        plain = [{**m, "content": message_text(m["content"])} for m in messages]
        try:
            return self.template.render(
                messages=plain, add_generation_prompt=add_generation_prompt, **self.special
            )
        except TemplateError as err:  # the template's raise_exception, an undefined name
            raise invalid(f"the chat template refused these messages: {err}", "messages") from None
        except Exception as err:  # a template that fails on these messages in Python
            raise invalid(
                f"the chat template failed on these messages: {type(err).__name__}: {err}",
                "messages",
            ) from None


def tokenizer_info(engine) -> dict[str, Any]:
    """`GET /tokenizer_info` (vLLM's shape): the served tokenizer's config, what lm-eval's remote
    tokenizer reads (`eos_token`, `bos_token`, `pad_token`, `chat_template`) always present."""
    config = tokenizer_config(engine.artifact_path)
    template = engine.chat_template
    return {
        **{k: v for k, v in config.items() if k != "chat_template"},
        "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
        "eos_token": config.get("eos_token", EOT_TOKEN),
        "bos_token": config.get("bos_token", EOT_TOKEN),
        "pad_token": config.get("pad_token"),
        "chat_template": None if template is None else template.source,
        "model_max_length": engine.max_context,
        "vocab_size": engine.tokenizer.vocab_size,
    }
