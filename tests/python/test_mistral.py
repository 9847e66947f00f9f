"""The official `mistralai` SDK against the same cluster (Mistral's dialect of the chat API),
checked against the `openai` SDK's answers from the same server: the cluster is started by
tests/tests/python_clients.rs (see test_clients.py for the environment it passes)."""

import os

import openai
import pytest
from http_api import post, post_ok
from mistralai.client import Mistral

# The system prompt Mistral's API prepends for `safe_prompt` (docs.mistral.ai/usage/guardrailing).
GUARDRAIL = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity."
)
QUESTION = [{"role": "user", "content": "Where does the tramontane blow?"}]




@pytest.fixture(scope="module")
def mistral():
    base = os.environ["TRAMONTANE_HTTP"].removesuffix("/v1")
    return Mistral(api_key="unused", server_url=base)


@pytest.fixture(scope="module")
def oai():
    return openai.OpenAI(base_url=os.environ["TRAMONTANE_HTTP"], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


def test_the_model_list_parses_as_mistral_cards(mistral, model):
    cards = mistral.models.list().data
    assert [c.id for c in cards] == [model]
    assert cards[0].type == "base" and cards[0].capabilities.completion_chat
    assert cards[0].max_context_length > 0


def test_chat_answers_as_the_openai_api_does(mistral, oai, model):
    ours = mistral.chat.complete(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    theirs = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.choices[0].finish_reason == "length" and ours.usage.completion_tokens == 8
    # `random_seed` is Mistral's `seed`.
    penalized = mistral.chat.complete(model=model, messages=QUESTION, max_tokens=8, temperature=0, presence_penalty=0.8, frequency_penalty=0.5)
    same = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0, presence_penalty=0.8, frequency_penalty=0.5)
    assert penalized.choices[0].message.content == same.choices[0].message.content
    sampled = mistral.chat.complete(model=model, messages=QUESTION, max_tokens=8, temperature=1.0, random_seed=11)
    seeded = oai.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=1.0, seed=11)
    assert sampled.choices[0].message.content == seeded.choices[0].message.content


def test_chat_streams_what_it_answers_whole(mistral, model):
    whole = mistral.chat.complete(model=model, messages=QUESTION, max_tokens=8, temperature=0)
    events = list(mistral.chat.stream(model=model, messages=QUESTION, max_tokens=8, temperature=0))
    text = "".join(e.data.choices[0].delta.content or "" for e in events)
    assert text == whole.choices[0].message.content
    assert events[-1].data.choices[0].finish_reason == "length"


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_safe_prompt_puts_the_guardrail_first(mistral, oai, model, system):
    own = [{"role": "system", "content": system}] if system else []
    guarded = mistral.chat.complete(model=model, messages=own + QUESTION, max_tokens=8, temperature=0, safe_prompt=True)
    # The same as the guardrail written as the system message (before the request's own).
    written = GUARDRAIL + ("\n\n" + system if system else "")
    explicit = oai.chat.completions.create(
        model=model, messages=[{"role": "system", "content": written}] + QUESTION, max_tokens=8, temperature=0
    )
    assert guarded.usage.prompt_tokens == explicit.usage.prompt_tokens
    assert guarded.choices[0].message.content == explicit.choices[0].message.content
    plain = mistral.chat.complete(model=model, messages=own + QUESTION, max_tokens=8, temperature=0)
    assert plain.usage.prompt_tokens < guarded.usage.prompt_tokens


def test_an_assistant_prefix_is_continued(mistral, oai, model):
    # The prompt ends with the prefix's text (not with the end of the assistant's turn), and
    # the reply continues it: the same as completing the prompt's tokens.
    prefix = "The tramontane blows"
    messages = QUESTION + [{"role": "assistant", "content": prefix, "prefix": True}]
    reply = mistral.chat.complete(model=model, messages=messages, max_tokens=6, temperature=0)
    ids = post_ok("/tokenize", {"messages": messages})["tokens"]
    text = post_ok("/detokenize", {"tokens": ids})["prompt"]
    assert text.endswith(prefix)
    continued = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == continued.choices[0].text
    assert reply.usage.prompt_tokens == len(ids)
    # Only the last message, an assistant's, may be a prefix (the openai SDK sends the field as
    # given; Mistral's drops it from a user message).
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi", "prefix": True}], max_tokens=2)
    assert e.value.param == "messages" and "prefix" in str(e.value)


def test_fim_fills_the_middle_or_is_refused(mistral, oai, model):
    prompt, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))"
    card = mistral.models.list().data[0]
    if not card.capabilities.completion_fim:
        # A tokenizer without [SUFFIX]/[PREFIX] (v1): a 400 naming the model, never a guess.
        status, body = post("/v1/fim/completions", {"model": model, "prompt": prompt, "suffix": suffix})
        assert status == 400 and body["error"]["param"] == "model" and "fill-in-the-middle" in body["error"]["message"]
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=model, prompt=prompt, suffix=suffix, max_tokens=2)
        assert e.value.param == "model"
        return
    # The prompt is <s>[SUFFIX]suffix[PREFIX]prompt (its encoding checked against mistral-common
    # in worker/cluster/tests/fim.rs); the middle is what completing those tokens gives.
    ids = post_ok("/tokenize", {"prompt": prompt, "suffix": suffix})["tokens"]
    fim = mistral.fim.complete(model=model, prompt=prompt, suffix=suffix, max_tokens=6, temperature=0)
    plain = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
    assert fim.choices[0].message.content == plain.choices[0].text
    assert fim.usage.prompt_tokens == len(ids) and fim.choices[0].finish_reason == "length"
    streamed = list(mistral.fim.stream(model=model, prompt=prompt, suffix=suffix, max_tokens=6, temperature=0))
    assert "".join(e.data.choices[0].delta.content or "" for e in streamed) == plain.choices[0].text
    without = post_ok("/tokenize", {"prompt": prompt, "suffix": ""})["tokens"]
    # OpenAI's completions `suffix` is the same fill-in-the-middle.
    suffixed = oai.completions.create(model=model, prompt=prompt, suffix=suffix, max_tokens=6, temperature=0)
    assert suffixed.choices[0].text == plain.choices[0].text
    # No suffix: <s>[SUFFIX][PREFIX]prompt, the same prompt tokens.
    assert without[:2] == ids[:2] and ids[ids.index(without[2]):] == without[2:] and len(without) < len(ids)
