"""The router's own tokenizer (router/tokenizer.py) against the engine's, on the real model: the same
token ids for every kind of prompt, and the same refusals."""
from __future__ import annotations

import pytest
import ray

from helpers import STORY, tokenize
from pdserve.base.types import InvalidRequestError, PromptInput
from router.tokenizer import PromptTokenizer

SAME_IDS = [
    ("plain", PromptInput(text="The capital of France is")),
    ("unicode", PromptInput(text="Café crème, 東京タワー, Ελληνικά, emoji 🚀🙂 and a ZWJ 👩‍💻")),
    ("whitespace", PromptInput(text="  leading spaces,\ttabs,\n\nblank lines, trailing  \n")),
    ("special_token_text", PromptInput(text="<|im_start|>user\nhello<|im_end|>\n<|endoftext|>")),
    ("code", PromptInput(text="def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # ok\n")),
    ("numbers", PromptInput(text="3.14159 2,718 1e-9 0x1F 1234567890")),
    ("long", PromptInput(text=STORY * 4)),
    ("chat_user", PromptInput(messages=(("user", "What is the capital of France?"),))),
    ("chat_system", PromptInput(messages=(("system", "You are terse."), ("user", "Name three colors.")))),
    ("chat_turns", PromptInput(messages=(("user", "Hi"), ("assistant", "Hello! How can I help?"),
                                         ("user", "Tell me a joke about 🐍.")))),
    ("chat_special_tokens_in_content", PromptInput(messages=(("user", "say <|im_end|> please"),))),
    ("token_ids", PromptInput(token_ids=(1, 2, 3, 49151))),
]

REFUSED = [
    ("out_of_vocabulary", PromptInput(token_ids=(5, 49152))),
    ("too_long", PromptInput(text="word " * 3000)),
    ("empty", PromptInput(text="")),
]


@pytest.fixture(scope="module")
def router_tokenizer(cluster):
    tokenizer = PromptTokenizer.load(cluster.model_info.model, cluster.model_info.max_model_len)
    assert tokenizer is not None
    return tokenizer


@pytest.mark.parametrize("name,prompt", SAME_IDS, ids=[c[0] for c in SAME_IDS])
def test_router_ids_equal_the_engines(cluster, router_tokenizer, name, prompt):
    assert router_tokenizer.tokenize(prompt) == tokenize(cluster, prompt)


@pytest.mark.parametrize("name,prompt", REFUSED, ids=[c[0] for c in REFUSED])
def test_router_refuses_as_the_engine_does(cluster, router_tokenizer, name, prompt):
    with pytest.raises(InvalidRequestError) as ours:
        router_tokenizer.tokenize(prompt)
    with pytest.raises(ray.exceptions.RayTaskError) as theirs:
        tokenize(cluster, prompt)
    assert str(ours.value) in str(theirs.value)


def test_a_model_without_tokenizer_files_falls_back_to_the_workers(tmp_path):
    assert PromptTokenizer.load(str(tmp_path), 2048) is None


@pytest.mark.parametrize("prompt", [dict(prompt="The capital of France is"),
                                    dict(messages=[("user", "Name three colors.")])], ids=["text", "chat"])
def test_both_tokenizing_paths_serve_the_same_request(cluster, router, prompt):
    """A router that tokenizes itself and one that asks a worker answer identically (greedy)."""
    from conftest import start_router, stop_router
    from pdserve.client import PdServeClient, build_request

    on_workers = start_router(cluster.prefill, cluster.decode, cluster.model_info, metrics=False,
                              tokenize_in_router=False)
    assert router.server.dispatcher.preparer.tokenizer is not None
    assert on_workers.server.dispatcher.preparer.tokenizer is None
    answers = []
    try:
        for target in (router.target, on_workers.target):
            client = PdServeClient(target)
            try:
                answers.append(client.complete(build_request(**prompt, max_tokens=8, ignore_eos=True), timeout_s=60))
            finally:
                client.close()
    finally:
        stop_router(on_workers)
    ours, theirs = answers
    assert ours.token_ids == theirs.token_ids
    assert ours.final.usage.prompt_tokens == theirs.final.usage.prompt_tokens > 0
