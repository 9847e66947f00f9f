"""End-to-end tests with the real clients a user runs: the official `openai` SDK against the
OpenAI-compatible HTTP API, and `grpcio` stubs generated from proto/ against the gRPC API.

The cluster is started by tests/tests/python_clients.rs, which passes:
  TRAMONTANE_HTTP   base URL of the HTTP API (http://host:port/v1)
  TRAMONTANE_GRPC   host:port of the gRPC API
  TRAMONTANE_STUBS  directory holding the generated tramontane/v1/inference_pb2*.py
  TRAMONTANE_REFERENCE  the fixture's reference.json (transformers outputs)
"""

import json
import os
import sys
import threading
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from http_api import post

sys.path.insert(0, os.environ["TRAMONTANE_STUBS"])
from tramontane.v1 import inference_pb2 as pb  # noqa: E402
from tramontane.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

REFERENCE = json.load(open(os.environ["TRAMONTANE_REFERENCE"]))
TEXT_CASES = [c for c in REFERENCE["cases"] if c["prompt_text"]]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=os.environ["TRAMONTANE_HTTP"], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stub():
    channel = grpc.insecure_channel(os.environ["TRAMONTANE_GRPC"])
    return pb_grpc.InferenceStub(channel)


def model_name(client):
    return client.models.list().data[0].id


@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: str(len(c["prompt_ids"])))
def test_completion_reproduces_transformers(client, case):
    n = len(case["greedy_ids"])
    out = client.completions.create(
        model=model_name(client), prompt=case["prompt_text"], max_tokens=n, temperature=0, logprobs=1,
        extra_body={"return_tokens_as_token_ids": True},
    )
    choice = out.choices[0]
    ids = [int(t.split(":")[1]) for t in choice.logprobs.tokens]
    assert ids == case["greedy_ids"]
    for ours, theirs in zip(choice.logprobs.token_logprobs, case["greedy_logprobs"]):
        assert abs(ours - theirs) <= 2e-3
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(case["prompt_ids"])
    assert out.usage.completion_tokens == n


@pytest.mark.parametrize("max_tokens", [1, 0])
@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: str(len(c["prompt_ids"])))
def test_echo_scores_the_prompt_as_transformers_does(client, case, max_tokens):
    # The request evaluation harnesses send to score text: echo the prompt with logprobs;
    # with max_tokens 0 nothing is generated.
    n = len(case["prompt_ids"])
    out = client.completions.create(
        model=model_name(client), prompt=case["prompt_ids"], max_tokens=max_tokens, temperature=0, logprobs=1, echo=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = out.choices[0].logprobs
    assert [int(t.split(":")[1]) for t in lp.tokens] == case["prompt_ids"] + case["greedy_ids"][:max_tokens]
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + max_tokens
    # Nothing precedes the first prompt token: no logprob (as vLLM and OpenAI answer).
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(case["prompt_logprobs"]) == n and case["prompt_logprobs"][0] is None
    for ours, theirs in zip(lp.token_logprobs[1:n], case["prompt_logprobs"][1:], strict=True):
        assert abs(ours - theirs) <= 2e-3
    for ours, theirs in zip(lp.token_logprobs[n:], case["greedy_logprobs"][:max_tokens], strict=True):
        assert abs(ours - theirs) <= 2e-3
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    assert out.usage.prompt_tokens == n and out.usage.completion_tokens == max_tokens
    assert out.choices[0].finish_reason == "length"


def test_max_tokens_zero_only_scores_an_echoed_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name(client), prompt="hi", max_tokens=0)
    assert e.value.param == "max_tokens" and "echo" in str(e.value)
    out = client.completions.create(model=model_name(client), prompt=TEXT_CASES[0]["prompt_text"], max_tokens=0, echo=True)
    assert out.choices[0].text == TEXT_CASES[0]["prompt_text"] and out.choices[0].logprobs is None
    assert out.usage.completion_tokens == 0


@pytest.mark.parametrize("case", TEXT_CASES, ids=lambda c: str(len(c["prompt_ids"])))
def test_echo_offsets_index_the_text(client, case):
    # text_offset[i] is where token i's text starts in `text` (characters): BOS, which
    # the text leaves out, takes no room; a stop string may cut the text, never an offset past it.
    out = client.completions.create(model=model_name(client), prompt=case["prompt_text"], max_tokens=6, temperature=0, logprobs=0, echo=True)
    choice = out.choices[0]
    text, lp = choice.text, choice.logprobs
    assert text.startswith(case["prompt_text"])
    assert lp.tokens[0] == "<s>" and lp.text_offset[:2] == [0, 0]
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(text)
    for token, at in zip(lp.tokens[1:], lp.text_offset[1:]):
        if "\ufffd" not in token:  # a byte of a character: its text is the whole character's
            assert text[at:].lstrip().startswith(token.lstrip()), (token, at, text)
    stream = client.completions.create(model=model_name(client), prompt=case["prompt_text"], max_tokens=6, temperature=0, logprobs=0, stream=True)
    streamed = [(c.choices[0].text, c.choices[0].logprobs) for c in stream]
    completion = "".join(t for t, _ in streamed)
    assert [o for _, lp in streamed if lp for o in lp.text_offset] == [at - len(case["prompt_text"]) for at in lp.text_offset[-6:]]
    assert text == case["prompt_text"] + completion


def test_streamed_completion_equals_the_whole_one(client):
    prompt = TEXT_CASES[0]["prompt_text"]
    whole = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=model_name(client), prompt=prompt, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_streamed_and_whole_agree(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the tramontane blow?"}]
    whole = client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 8


def test_n_choices_draw_with_consecutive_seeds(client):
    kwargs = dict(model=model_name(client), prompt=TEXT_CASES[0]["prompt_text"], max_tokens=6, temperature=1.0)
    out = client.completions.create(**kwargs, n=3, seed=5)
    assert [c.index for c in out.choices] == [0, 1, 2]
    # Choice i is what a request with seed + i answers.
    alone = [client.completions.create(**kwargs, seed=5 + i).choices[0].text for i in range(3)]
    assert [c.text for c in out.choices] == alone and len(set(alone)) > 1
    assert out.usage.completion_tokens == 18 and out.usage.prompt_tokens == len(TEXT_CASES[0]["prompt_ids"])
    # Streamed: the chunks of the choices interleave; each choice's text is the same, and the
    # last chunk, asked for with include_usage, has no choices and the usage.
    chunks = list(client.completions.create(**kwargs, n=3, seed=5, stream=True, stream_options={"include_usage": True}))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == alone
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18
    assert all(c.usage is None for c in chunks[:-1])
    ends = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert ends == ["length"] * 3
    # Chat: the same, and without include_usage no usage chunk.
    messages = [{"role": "user", "content": "Where does the tramontane blow?"}]
    chat = client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=5, temperature=1.0, seed=9, n=2)
    one = client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=5, temperature=1.0, seed=10)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[1].message.content == one.choices[0].message.content
    streamed = list(client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=5, temperature=1.0, seed=9, n=2, stream=True))
    assert all(c.choices and c.usage is None for c in streamed)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == 1) == one.choices[0].message.content
    for bad in [0, 17]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kwargs, n=bad)
        assert e.value.param == "n" and "1..=16" in str(e.value)


def test_logit_bias_min_tokens_ignore_eos_and_special_tokens(client):
    kwargs = dict(model=model_name(client), prompt=TEXT_CASES[0]["prompt_text"], max_tokens=5, temperature=0, logprobs=0)
    ids = lambda out: [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]  # noqa: E731
    as_ids = {"return_tokens_as_token_ids": True}
    # A bias that makes EOS (id 2) the choice at once; the text leaves it out unless asked.
    eos = client.completions.create(**kwargs, logit_bias={"2": 100}, extra_body=as_ids)
    assert ids(eos) == [2] and eos.choices[0].finish_reason == "stop" and eos.choices[0].text == ""
    kept = client.completions.create(**kwargs, logit_bias={"2": 100}, extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == "</s>"
    # min_tokens holds EOS off for three tokens; ignore_eos lets it run to max_tokens.
    held = client.completions.create(**kwargs, logit_bias={"2": 100}, extra_body={"min_tokens": 3, **as_ids})
    assert ids(held)[3:] == [2] and 2 not in ids(held)[:3] and held.choices[0].finish_reason == "stop"
    ignored = client.completions.create(**kwargs, logit_bias={"2": 100}, extra_body={"ignore_eos": True, **as_ids})
    assert ids(ignored) == [2] * 5 and ignored.choices[0].finish_reason == "length"
    for bad, param in [({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"2": 101}}, "logit_bias"),
                       ({"extra_body": {"min_tokens": 9}}, "min_tokens"), ({"presence_penalty": 2.5}, "presence_penalty"),
                       ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**{**kwargs, **bad})
        assert e.value.param == param, (bad, e.value)


def test_penalties_over_http_and_grpc_agree(client, stub):
    # A bias makes token 1000 the choice at every step; penalties on what the output already
    # holds make it lose after a few.
    prompt = TEXT_CASES[1]["prompt_ids"]
    kwargs = dict(model=model_name(client), prompt=prompt, max_tokens=12, temperature=0, logprobs=0, logit_bias={"1000": 10})
    extra = {"return_tokens_as_token_ids": True, "ignore_eos": True}
    ids = lambda out: [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]  # noqa: E731
    assert ids(client.completions.create(**kwargs, extra_body=extra)) == [1000] * 12
    penalties = dict(presence_penalty=1.0, frequency_penalty=2.0)
    http = ids(client.completions.create(**kwargs, **penalties, extra_body={**extra, "repetition_penalty": 1.2}))
    assert 1 <= http.count(1000) < 12 and http[0] == 1000, http
    sampling = pb.SamplingParams(max_tokens=12, repetition_penalty=1.2, ignore_eos=True, logit_bias={1000: 10}, **penalties)
    grpc_ids, _, _ = generate(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling))
    assert grpc_ids == http


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client):
    # A conversation no other test sends: nothing of it is cached the first time; the second
    # time every block but the one holding its last token is (blocks of 16 tokens, the
    # coordinator's default), and the answer is the same. Another cache_salt shares nothing.
    system = "You answer questions about the winds of the Mediterranean, briefly. " * 6
    kwargs = dict(model=model_name(client), max_tokens=6, temperature=0,
                  messages=[{"role": "system", "content": system}, {"role": "user", "content": "Which wind is the tramontane?"}])
    hits_before = metric("tramontane:prefix_cache_hits_total")
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    salted = client.chat.completions.create(**kwargs, extra_body={"cache_salt": "another tenant"})
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens > 32
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == first.choices[0].message.content == salted.choices[0].message.content
    assert metric("tramontane:prefix_cache_hits_total") - hits_before == (prompt_tokens - 1) // 16 * 16
    # Streamed, the usage chunk reports them too.
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (prompt_tokens - 1) // 16 * 16


def test_n_choices_prefill_their_prompt_once(client):
    # The choices go to one replica (routing counts the blocks a replica is computing), where
    # the later ones wait for the first one's blocks and skip their prefill.
    prompt = "North of the Pyrenees it is the tramontane; in the Rhone valley, the mistral. " * 3
    hits_before = metric("tramontane:prefix_cache_hits_total")
    out = client.completions.create(model=model_name(client), prompt=prompt, n=3, max_tokens=4, temperature=0.7, seed=3)
    cached = (out.usage.prompt_tokens - 1) // 16 * 16
    assert cached > 0
    assert metric("tramontane:prefix_cache_hits_total") - hits_before == 2 * cached
    # The prompt was prefilled once, by the first choice: none of it was cached for the request.
    assert out.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_logprobs_and_its_token_limit(client):
    messages = [{"role": "user", "content": "Where does the tramontane blow?"}]
    kwargs = dict(model=model_name(client), messages=messages, max_completion_tokens=4, temperature=0)
    out = client.chat.completions.create(**kwargs, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert out.usage.completion_tokens == len(content) == 4
    # Greedy: each token is its position's most likely; two alternatives each, most likely first.
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        assert t.top_logprobs[1].logprob <= t.logprob
    assert client.chat.completions.create(**kwargs).choices[0].logprobs is None


def test_top_k_1_is_greedy(client):
    kwargs = dict(model=model_name(client), prompt=TEXT_CASES[0]["prompt_text"], max_tokens=8)
    greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
    assert client.completions.create(**kwargs, temperature=1.5, seed=3, extra_body={"top_k": 1}).choices[0].text == greedy
    assert client.completions.create(**kwargs, temperature=1.5, seed=3).choices[0].text != greedy


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=model_name(client), prompt="The wind", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    text = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == text
    # Mistral's name for the seed, and fields at values that change nothing, are accepted.
    del kwargs["seed"]
    neutral = {"random_seed": 7, "safe_prompt": False, "user": "u1", "logit_bias": {}, "tool_choice": "none", "best_of": 1}
    assert client.completions.create(**kwargs, presence_penalty=0, frequency_penalty=0, extra_body=neutral).choices[0].text == text


@pytest.mark.parametrize("bad, param, needle", [
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"max_tokens": 100000}, "max_tokens", "context"),
    ({"model": "not-this-one"}, "model", "not served"),
    ({"n": 17}, "n", "`n`"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "`stream: true`"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    # Fields this server does not implement are refused, never ignored.
    ({"extra_body": {"best_of": 2}}, "best_of", "`best_of` is not supported"),
    ({"extra_body": {"logit_bias_typo": 1}}, "logit_bias_typo", "`logit_bias_typo` is not supported"),
    ({"extra_body": {"tools": [{"type": "function", "function": {"name": "f"}}]}}, "tools", "`tools` is not supported"),
])
def test_bad_input_is_a_400_naming_the_field(client, bad, param, needle):
    kwargs = dict(model=model_name(client), prompt="hi", max_tokens=4)
    kwargs.update(bad)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs)
    # The message says the limit; `param` names the field, as OpenAI's errors do.
    assert needle in str(e.value) and e.value.param == param, (e.value, e.value.body)


def generate(stub, request):
    ids, text, finish = [], "", None
    for msg in stub.Generate(request):
        ids.extend(msg.token_ids)
        text += msg.text
        if msg.finish_reason:
            finish = msg.finish_reason
    return ids, text, finish


def test_grpc_generate_stream_reproduces_transformers(stub):
    for case in TEXT_CASES:
        req = pb.GenerateRequest(text=case["prompt_text"], sampling=pb.SamplingParams(max_tokens=len(case["greedy_ids"])))
        ids, _, finish = generate(stub, req)
        assert ids == case["greedy_ids"]
        assert finish == pb.FINISH_REASON_LENGTH


def metric(name):
    base = os.environ["TRAMONTANE_HTTP"].rsplit("/v1", 1)[0]
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_grpc_concurrent_streams_equal_solo_runs_and_share_batches(stub):
    prompts = [[100 + 31 * i + j for j in range(3 + i % 5)] for i in range(32)]
    solo = [generate(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=pb.SamplingParams(max_tokens=8)))[0] for p in prompts]
    results = [None] * len(prompts)

    def run(i):
        results[i] = generate(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompts[i]), sampling=pb.SamplingParams(max_tokens=8)))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo
    # Steps that carried more than one sequence: the batch grew.
    assert metric('tramontane:batch_size_count') > metric('tramontane:batch_size_bucket{le="1"}')
    assert metric("tramontane:kv_cache_usage_blocks") == 0


def test_grpc_abort_and_invalid_argument(stub):
    stream = stub.Generate(pb.GenerateRequest(request_id="py-abort", text="hello", sampling=pb.SamplingParams(max_tokens=1000)))
    next(stream)
    assert stub.Abort(pb.AbortRequest(request_id="py-abort")).aborted
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="", sampling=pb.SamplingParams(max_tokens=4))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in e.value.details()


def wait_for_metric(name, value):
    """The metric once it reaches `value` (a generation is counted when it is dropped, just
    after its last message is sent), or its value after two seconds."""
    for _ in range(40):
        if metric(name) >= value:
            break
        threading.Event().wait(0.05)
    return metric(name)


def test_stop_strings_end_the_text_over_http_and_grpc(client, stub):
    prompt = TEXT_CASES[0]["prompt_text"]
    whole = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    # Three characters from the middle of the greedy text, cut where they first appear.
    mid = len(whole) // 2
    stop = whole[mid:mid + 3]
    assert len(stop) == 3, whole
    want = whole[:whole.index(stop)]
    stops = 'tramontane:request_success_total{finished_reason="stop"}'
    before = metric(stops)

    cut = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (want, "stop")
    chunks = list(client.completions.create(model=model_name(client), prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    _, text, finish = generate(stub, pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(max_tokens=16, stop=[stop])))
    assert (text, finish) == (want, pb.FINISH_REASON_STOP)
    # Each is counted as a stop, not an abort.
    assert wait_for_metric(stops, before + 3) == before + 3

    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(max_tokens=4, stop=["a"] * 5))))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "`stop`" in e.value.details()




def test_tokenize_and_detokenize_over_http(stub):
    case = TEXT_CASES[0]
    status, out = post("/tokenize", {"prompt": case["prompt_text"]})
    assert status == 200, out
    assert (out["tokens"], out["count"]) == (case["prompt_ids"], len(case["prompt_ids"]))
    status, back = post("/detokenize", {"tokens": out["tokens"], "skip_special_tokens": True})
    grpc_text = stub.Detokenize(pb.DetokenizeRequest(ids=out["tokens"], skip_special_tokens=True)).text
    assert (status, back["prompt"]) == (200, grpc_text)
    status, chat = post("/tokenize", {"messages": [{"role": "user", "content": "Where does the tramontane blow?"}]})
    assert status == 200 and chat["count"] == len(chat["tokens"]) > 0, chat
    for body, needle in [
        ({"prompt": "hi", "messages": []}, "exactly one"),
        ({"prompt": "hi", "typo": 1}, "typo"),
        ({"tokens": [10**9]}, "`tokens` must be <"),
    ]:
        status, err = post("/detokenize" if "tokens" in body else "/tokenize", body)
        assert status == 400 and needle in err["error"]["message"], (body, err)


def test_grpc_standard_health_and_reflection():
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(os.environ["TRAMONTANE_GRPC"])
    health = health_pb2_grpc.HealthStub(channel)
    for service in ["", "tramontane.v1.Inference"]:
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert "tramontane.v1.Inference" in names


def test_liveness_and_readiness_endpoints_for_probes():
    base = os.environ["TRAMONTANE_HTTP"].rsplit("/v1", 1)[0]
    assert urllib.request.urlopen(base + "/livez").status == 200
    assert urllib.request.urlopen(base + "/health").status == 200


def test_oversized_body_is_a_400_naming_the_limit():
    base = os.environ["TRAMONTANE_HTTP"]
    body = json.dumps({"prompt": "a" * (3 << 20)}).encode()
    req = urllib.request.Request(base + "/completions", data=body, headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400
    assert "2097152 bytes" in e.value.read().decode()
