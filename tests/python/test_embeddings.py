"""Embeddings through both SDKs: `/v1/embeddings` (OpenAI's shape and Mistral's) and the gRPC
Embed RPC. Against the embedding fixture (a `MistralModel`, tests/fixtures/mistral-embed-tiny)
they must equal transformers' pooled hidden states within 1e-4 cosine; against a causal LM
(served for generation) they must hold their shape: unit length, a batch equal to its inputs
one at a time, texts equal to their tokens. Run by tests/tests/python_clients.rs (see
test_clients.py for the environment it passes).
"""

import json
import math
import os
import sys
import typing

import grpc
import openai
import pytest
from http_api import post
from mistralai.client import Mistral
from mistralai.client import models as mistral_models
from openai.types import embedding_create_params

sys.path.insert(0, os.environ["TRAMONTANE_STUBS"])
from tramontane.v1 import inference_pb2 as pb  # noqa: E402
from tramontane.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

REFERENCE = json.load(open(os.environ["TRAMONTANE_REFERENCE"]))
EMBEDDING_FIXTURE = "last" in REFERENCE["cases"][0]
TEXTS = ["The tramontane blows", "over Perpignan", "Le vent \u2744\ufe0f"]


@pytest.fixture(scope="module")
def oai():
    return openai.OpenAI(base_url=os.environ["TRAMONTANE_HTTP"], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def mistral():
    return Mistral(api_key="unused", server_url=os.environ["TRAMONTANE_HTTP"].removesuffix("/v1"))


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id




def cosine(a, b):
    assert len(a) == len(b)
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def close(a, b):
    return cosine(a, b) >= 1 - 1e-4


def test_token_id_inputs_embed_as_transformers_or_alone(oai, model):
    prompts = [c["prompt_ids"] for c in REFERENCE["cases"]]
    # The openai SDK asks for base64 and decodes it; floats must say the same.
    batch = oai.embeddings.create(model=model, input=prompts)
    floats = oai.embeddings.create(model=model, input=prompts, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(len(prompts)))
    assert batch.usage.prompt_tokens == sum(map(len, prompts)) and batch.usage.total_tokens == batch.usage.prompt_tokens
    for i, (d, f) in enumerate(zip(batch.data, floats.data, strict=True)):
        assert d.embedding == pytest.approx(f.embedding, abs=1e-7)
        assert abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-5
        if EMBEDDING_FIXTURE:
            assert close(d.embedding, REFERENCE["cases"][i]["last"]), (i, cosine(d.embedding, REFERENCE["cases"][i]["last"]))
        alone = oai.embeddings.create(model=model, input=prompts[i]).data[0].embedding
        assert close(alone, d.embedding)


def test_texts_through_both_sdks_and_grpc(oai, mistral, model):
    ours = oai.embeddings.create(model=model, input=TEXTS)
    theirs = mistral.embeddings.create(model=model, inputs=TEXTS)
    for a, b in zip(ours.data, theirs.data, strict=True):
        assert close(a.embedding, b.embedding)
    # A text is its tokens with BOS first and EOS last (e5-mistral's inputs).
    status, tok = post("/tokenize", {"prompt": TEXTS[0]})
    assert status == 200 and tok["tokens"][0] == 1
    as_ids = oai.embeddings.create(model=model, input=tok["tokens"] + [2]).data[0].embedding
    assert close(as_ids, ours.data[0].embedding)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(os.environ["TRAMONTANE_GRPC"]))
    answer = stub.Embed(pb.EmbedRequest(texts=TEXTS[:2], token_ids=[pb.TokenIds(ids=tok["tokens"] + [2])]))
    got = [list(e.values) for e in answer.embeddings]
    assert len(got) == 3 and close(got[0], ours.data[0].embedding) and close(got[1], ours.data[1].embedding) and close(got[2], as_ids)
    two = oai.embeddings.create(model=model, input=TEXTS[:2]).usage.prompt_tokens
    assert answer.usage.prompt_tokens == two + len(tok["tokens"]) + 1
    assert theirs.usage.prompt_tokens == ours.usage.prompt_tokens


def test_embedding_fields_are_honoured_or_refused(oai, model):
    width = len(oai.embeddings.create(model=model, input="x", encoding_format="float").data[0].embedding)
    assert oai.embeddings.create(model=model, input="x", dimensions=width, user="u1").data[0].embedding
    for body, param in [({"dimensions": width - 1}, "dimensions"), ({"output_dimension": 3}, "dimensions"),
                        ({"encoding_format": "int8"}, "encoding_format"), ({"output_dtype": "int8"}, "output_dtype"),
                        ({"metadata": {"k": 1}}, "metadata"), ({"input": []}, "input")]:
        status, err = post("/v1/embeddings", {"model": model, "input": "x", **body})
        assert status == 400 and err["error"]["param"] == param, (body, err)
    # Every field of both SDKs' request schemas is one of those, or input/inputs and model.
    fields = set(typing.get_type_hints(embedding_create_params.EmbeddingCreateParams)) | set(mistral_models.EmbeddingRequest.model_fields)
    assert fields <= {"input", "inputs", "model", "dimensions", "output_dimension", "encoding_format", "output_dtype", "metadata", "user"}, fields


@pytest.mark.skipif(not EMBEDDING_FIXTURE, reason="the served model generates too")
def test_an_embedding_model_refuses_generation(oai, model):
    card = oai.models.list().data[0]
    assert card.model_extra["capabilities"]["completion_chat"] is False
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model, prompt="hi", max_tokens=2)
    assert e.value.param == "model" and "embeddings only" in str(e.value)
