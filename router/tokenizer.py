"""``PromptTokenizer``: a prompt's token ids computed in the router, identical to the engines' own
(``pdserve.engine.host.EngineHost.tokenize``), so a request is routed without a round trip to a worker.

It reads the model's files directly: ``tokenizer.json`` with the ``tokenizers`` library, and the
chat template (``chat_template.jinja`` or ``tokenizer_config.json``) rendered the way transformers
renders it (a sandboxed jinja2 environment with trimmed blocks, its ``tojson``, ``raise_exception``
and ``strftime_now``, and the special tokens as variables). No torch, no transformers, no vLLM.
Where the files cannot be read (a router apart from the model), ``load`` returns None and the
dispatcher asks a prefill worker instead. tests/test_e2e_tokenizer.py compares both on the engine.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from pdserve.base.types import InvalidRequestError, PromptInput

INLINE_BYTES = 4096
"""Text prompts up to this size are tokenized on the router's event loop; longer ones on a thread."""
_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class PromptTokenizer:
    """Token ids and the length checks of the engines, from the model's tokenizer files."""

    def __init__(self, tokenizer: Any, template: Any, special: dict[str, str], max_model_len: int) -> None:
        self._tokenizer, self._template, self._special = tokenizer, template, special
        self.max_model_len = max_model_len
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, model_dir: str, max_model_len: int) -> PromptTokenizer | None:
        """The tokenizer of the model in ``model_dir``, or None when its files are not readable here."""
        root = Path(model_dir)
        if not (root / "tokenizer.json").is_file():
            return None
        from tokenizers import Tokenizer

        config = _json(root / "tokenizer_config.json")
        source = (root / "chat_template.jinja").read_text() if (root / "chat_template.jinja").is_file() \
            else config.get("chat_template")
        special = {k: _token_text(config[k]) for k in _SPECIAL if config.get(k)}
        return cls(Tokenizer.from_file(str(root / "tokenizer.json")), _compile(source) if source else None,
                   special, max_model_len)

    def tokenize(self, prompt: PromptInput) -> list[int]:
        """Token ids of the prompt (chat template applied to messages); InvalidRequestError for
        ids outside the vocabulary, an empty prompt, or one that leaves no room for output."""
        if prompt.token_ids is not None:
            ids = list(prompt.token_ids)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})")
        else:
            ids = self._tokenizer.encode(self.text_of(prompt), add_special_tokens=False).ids
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt is {len(ids)} tokens; the model's context is {self.max_model_len} "
                                      "(prompt must leave room for at least one output token)")
        return ids

    def text_of(self, prompt: PromptInput) -> str:
        """The text that is encoded: the prompt, or the messages rendered by the chat template."""
        if prompt.messages is None:
            return prompt.text or ""
        if self._template is None:
            raise InvalidRequestError("this model has no chat template; send a text prompt")
        messages = [{"role": role, "content": content} for role, content in prompt.messages]
        return self._template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                     **self._special)

    @staticmethod
    def inline(prompt: PromptInput) -> bool:
        """Whether tokenizing ``prompt`` is cheap enough for the event loop."""
        size = len(prompt.text or "") + sum(len(c) for _, c in prompt.messages or ())
        return size <= INLINE_BYTES


def _compile(source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (training templates mark assistant text with
        it): renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)
