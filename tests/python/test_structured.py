"""Structured output and function calling through the official SDKs and gRPC (the cluster is
started by tests/tests/python_clients.rs; see test_clients.py for its environment).

The fixtures' weights are random: left free they write gibberish, so every generation here is
held to its grammar by constrained decoding alone, and must parse and validate (Python's
`jsonschema`) every time. Strings in the schemas are bounded (`maxLength`, `pattern`, `enum`):
a random model closes an unbounded JSON string only by chance (about one token in two hundred);
`json_object`, whose strings are free, biases the quote token for the same reason (over the
OpenAI SDK: Mistral's has no `logit_bias`; its `response_format` is the same field, tested with
the schemas).
"""

import json
import os
import re
import sys
import urllib.request

import grpc
import jsonschema
import openai
import pytest
from http_api import post, post_ok
from mistralai.client import Mistral

sys.path.insert(0, os.environ["TRAMONTANE_STUBS"])
from tramontane.v1 import inference_pb2 as pb  # noqa: E402
from tramontane.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

ASK = [{"role": "user", "content": "Describe a city as JSON."}]
SEEDS = [1, 2, 3]

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 10},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "city": {"type": "string", "maxLength": 12}},
                "required": ["zip", "city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "bounded_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 5},
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "ranges": {
        "type": "object",
        "properties": {"t": {"type": "number", "minimum": -10.5, "maximum": 40}, "p": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000}},
        "required": ["t", "p"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9},
            "note": {"type": "string", "maxLength": 8},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "any_of": {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"type": "string", "maxLength": 5}]},
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "local_time",
        "description": "The time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"], "additionalProperties": False},
    },
}
TOOLS = [WEATHER, CLOCK]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def oai():
    return openai.OpenAI(base_url=os.environ["TRAMONTANE_HTTP"], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def mistral():
    return Mistral(api_key="unused", server_url=os.environ["TRAMONTANE_HTTP"].removesuffix("/v1"))


@pytest.fixture(scope="module")
def stub():
    return pb_grpc.InferenceStub(grpc.insecure_channel(os.environ["TRAMONTANE_GRPC"]))


@pytest.fixture(scope="module")
def model(oai):
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def calls_tools(model):
    """Whether the served tokenizer has Mistral's tool tokens (v3); v1 refuses tools."""
    with urllib.request.urlopen(os.environ["TRAMONTANE_HTTP"] + "/models") as r:
        return json.load(r)["data"][0]["capabilities"]["function_calling"]


def json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def streamed_openai(stream):
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("streamed", [False, True])
def test_json_schemas_hold_through_the_openai_sdk(oai, model, name, streamed):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        args = dict(model=model, messages=ASK, max_tokens=400, temperature=1.0, seed=seed, response_format=json_schema_format(schema))
        if streamed:
            text, finish = streamed_openai(oai.chat.completions.create(stream=True, **args))
        else:
            r = oai.chat.completions.create(**args)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop", (name, seed, text)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schemas_hold_through_the_mistral_sdk_streamed_or_not(mistral, model, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        args = dict(model=model, messages=ASK, max_tokens=400, temperature=1.0, random_seed=seed, response_format=json_schema_format(schema))
        whole = mistral.chat.complete(**args)
        text = whole.choices[0].message.content
        assert whole.choices[0].finish_reason == "stop", (name, seed, text)
        jsonschema.validate(json.loads(text), schema)
        streamed = "".join(e.data.choices[0].delta.content or "" for e in mistral.chat.stream(**args) if e.data.choices)
        assert streamed == text


def test_json_object_through_the_openai_sdk(oai, model):
    quote = post_ok("/tokenize", {"model": model, "prompt": '"', "add_special_tokens": False})["tokens"][-1]
    for seed in range(1, 9):
        args = dict(model=model, messages=ASK, max_tokens=1500, temperature=1.0, response_format={"type": "json_object"})
        r = oai.chat.completions.create(seed=seed, logit_bias={str(quote): 8}, **args)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        streamed, finish = streamed_openai(oai.chat.completions.create(seed=seed, logit_bias={str(quote): 8}, stream=True, **args))
        assert (streamed, finish) == (r.choices[0].message.content, "stop")


@pytest.mark.parametrize("streamed", [False, True])
def test_regex_choice_and_lark_over_vllms_structured_outputs(oai, model, streamed):
    cases = [
        ({"regex": "[A-Z]{3}-[0-9]{2,4}"}, lambda t: re.fullmatch("[A-Z]{3}-[0-9]{2,4}", t)),
        ({"choice": ["north wind", "south wind", "calm"]}, lambda t: t in ["north wind", "south wind", "calm"]),
        ({"grammar": 'start: "wind " ("force " /[0-9]/ | "calm")'}, lambda t: re.fullmatch("wind (force [0-9]|calm)", t)),
    ]
    for outputs, ok in cases:
        for seed in SEEDS:
            args = dict(model=model, prompt="The tramontane", max_tokens=50, temperature=1.0, seed=seed, extra_body={"structured_outputs": outputs})
            if streamed:
                chunks = list(oai.completions.create(stream=True, **args))
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]
            else:
                r = oai.completions.create(**args)
                text, finish = r.choices[0].text, r.choices[0].finish_reason
            assert finish == "stop" and ok(text), (outputs, seed, text)


def test_grpc_constraints(stub):
    def run(**constraint):
        req = pb.GenerateRequest(text="The tramontane", sampling=pb.SamplingParams(max_tokens=300, temperature=1.0, seed=4), **constraint)
        return "".join(m.text for m in stub.Generate(req))

    schema = SCHEMAS["nested"]
    jsonschema.validate(json.loads(run(json_schema=json.dumps(schema))), schema)
    assert re.fullmatch("[a-f]{8}", run(regex="[a-f]{8}"))
    assert run(choice=pb.Choices(choices=["yes", "no"])) in ["yes", "no"]
    with pytest.raises(grpc.RpcError) as e:
        run(json_schema='{"type": "array", "uniqueItems": true}')
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "uniqueItems" in e.value.details()


@pytest.mark.parametrize("body, param, needle", [
    ({"response_format": json_schema_format({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not supported"),
    ({"structured_outputs": {"regex": "("}}, "structured_outputs", ""),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs", "response_format"),
])
def test_unsupported_constraints_are_a_400_naming_the_field(model, body, param, needle):
    status, answer = post("/v1/chat/completions", {"model": model, "messages": ASK, "max_tokens": 8, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == param and needle in answer["error"]["message"], answer


def check_calls(calls, allowed):
    assert calls, "a call"
    for call in calls:
        assert re.fullmatch("[a-zA-Z0-9]{9}", call.id), call.id
        assert call.function.name in allowed
        arguments = call.function.arguments
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        jsonschema.validate(arguments, PARAMETERS[call.function.name])


def test_tools_are_refused_without_tool_tokens(oai, model, calls_tools):
    if calls_tools:
        pytest.skip("this tokenizer has tool tokens (tested below)")
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model, messages=ASK, max_tokens=8, tools=TOOLS)
    assert e.value.body["param"] == "tools" and "[TOOL_CALLS]" in e.value.body["message"]


@pytest.mark.parametrize("streamed", [False, True])
def test_required_tool_calls_are_valid_calls_through_the_openai_sdk(oai, model, calls_tools, streamed):
    if not calls_tools:
        pytest.skip("v1 tokenizer: tools are refused (tested above)")
    for seed in range(1, 7):
        args = dict(model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], max_tokens=1500, temperature=1.0, seed=seed, tools=TOOLS, tool_choice="required")
        if not streamed:
            r = oai.chat.completions.create(**args)
            assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
            check_calls(r.choices[0].message.tool_calls, PARAMETERS)
            continue
        calls, finish = [], None
        for chunk in oai.chat.completions.create(stream=True, **args):
            for c in chunk.choices:
                calls.extend(c.delta.tool_calls or [])
                finish = c.finish_reason or finish
        assert finish == "tool_calls"
        check_calls(calls, PARAMETERS)


def test_any_and_named_tool_calls_through_the_mistral_sdk(mistral, model, calls_tools):
    if not calls_tools:
        pytest.skip("v1 tokenizer: tools are refused")
    for seed in range(1, 7):
        args = dict(model=model, messages=[{"role": "user", "content": "Time in Paris?"}], max_tokens=1500, temperature=1.0, random_seed=seed, tools=TOOLS)
        r = mistral.chat.complete(tool_choice="any", **args)
        assert r.choices[0].finish_reason == "tool_calls"
        check_calls(r.choices[0].message.tool_calls, PARAMETERS)
        named = mistral.chat.complete(tool_choice={"type": "function", "function": {"name": "local_time"}}, parallel_tool_calls=False, **args)
        check_calls(named.choices[0].message.tool_calls, ["local_time"])
        assert len(named.choices[0].message.tool_calls) == 1
        streamed = [e.data.choices[0].delta for e in mistral.chat.stream(tool_choice="any", **args) if e.data.choices]
        calls = [c for d in streamed for c in (d.tool_calls or [])]
        assert [c.function.name for c in calls] == [c.function.name for c in r.choices[0].message.tool_calls]


def test_a_tool_round_trip(oai, mistral, model, calls_tools):
    if not calls_tools:
        pytest.skip("v1 tokenizer: tools are refused")
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Oslo?"}]
    first = oai.chat.completions.create(model=model, messages=messages, max_tokens=300, temperature=1.0, seed=7, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    calls = first.choices[0].message.tool_calls
    check_calls(calls, PARAMETERS)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    for call in calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 9, "sky": "rain"})})
    answer = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, tools=TOOLS, tool_choice="none")
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content
    # The same conversation through Mistral's SDK (its message classes) gets the same answer.
    same = mistral.chat.complete(model=model, messages=messages, max_tokens=12, temperature=0, tools=TOOLS, tool_choice="none")
    assert same.choices[0].message.content == answer.choices[0].message.content
    # Auto: text or valid calls.
    auto = oai.chat.completions.create(model=model, messages=messages, max_tokens=300, temperature=1.0, seed=3, tools=TOOLS, parallel_tool_calls=False)
    if auto.choices[0].message.tool_calls:
        check_calls(auto.choices[0].message.tool_calls, PARAMETERS)
    else:
        assert auto.choices[0].message.content


@pytest.mark.parametrize("bad, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {}}}]}, "tools"),
])
def test_bad_tool_requests_are_a_400(model, calls_tools, bad, param):
    if not calls_tools:
        pytest.skip("v1 tokenizer: tools are refused")
    status, answer = post("/v1/chat/completions", {"model": model, "messages": ASK, "max_tokens": 8, "tools": TOOLS, **bad})
    assert status == 400 and answer["error"]["param"] == param, answer
