"""API keys through the official SDKs, gRPC and `tramctl`, against `tramctl up --api-keys FILE`
(started by tests/tests/python_clients.rs, which passes the file as TRAMONTANE_API_KEYS and the
`tramctl` binary as TRAMONTANE_TRAMCTL; see test_clients.py for the rest). With
TRAMONTANE_TLS_CA the client APIs serve over TLS: every client here trusts that CA, and
plain-text clients are refused.

Each refusal and each acceptance: no key and a wrong key (401 / UNAUTHENTICATED), the probes
and /metrics open, the Admin API for an admin key only (PERMISSION_DENIED otherwise), a key's
requests-per-minute and tokens-per-minute limits (429 with Retry-After / RESOURCE_EXHAUSTED),
per-key usage equal to the sum of what the responses reported, and the file read again on
SIGHUP while a stream runs.
"""

import http.client
import json
import os
import pathlib
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import httpx2 as httpx
import openai
import pytest
from mistralai.client import Mistral

sys.path.insert(0, os.environ["TRAMONTANE_STUBS"])
from tramontane.v1 import inference_pb2 as pb  # noqa: E402
from tramontane.v1 import inference_pb2_grpc as pb_grpc  # noqa: E402

KEYS_FILE = pathlib.Path(os.environ["TRAMONTANE_API_KEYS"])
KEYS = {line.split()[0]: line.split()[1] for line in KEYS_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")}
HTTP = os.environ["TRAMONTANE_HTTP"]
ROOT = HTTP.removesuffix("/v1")
CA = os.environ.get("TRAMONTANE_TLS_CA")
SSL = ssl.create_default_context(cafile=CA) if CA else None
TRAMCTL = [os.environ["TRAMONTANE_TRAMCTL"]]
ADDR = ["--grpc-addr", os.environ["TRAMONTANE_GRPC"], *(["--tls-ca", CA] if CA else [])]


def oai(key):
    return openai.OpenAI(base_url=HTTP, api_key=key, max_retries=0, http_client=httpx.Client(verify=SSL) if CA else None)


def mistral(key):
    return Mistral(api_key=key, server_url=ROOT, client=httpx.Client(verify=SSL) if CA else None)


def grpc_channel(tls=bool(CA)):
    if not tls:
        return grpc.insecure_channel(os.environ["TRAMONTANE_GRPC"])
    return grpc.secure_channel(os.environ["TRAMONTANE_GRPC"], grpc.ssl_channel_credentials(root_certificates=pathlib.Path(CA).read_bytes()))


def grpc_call(method, request, key=None):
    channel = grpc_channel()
    metadata = [("authorization", f"Bearer {key}")] if key else []
    return method(pb_grpc.InferenceStub(channel), pb_grpc.AdminStub(channel))(request, metadata=metadata)


def request(path, body=None, root=ROOT):
    """GET (or POST `body` as JSON) without a key: (status, text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(root + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=SSL) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def get(path):
    return request(path)


@pytest.fixture(scope="module", autouse=True)
def served():
    """The model is served (over TLS the harness leaves this wait to the tests)."""
    for _ in range(3000):
        try:
            if get("/health")[0] == 200:
                return
        except OSError:
            pass
        threading.Event().wait(0.1)
    raise AssertionError("the cluster did not become ready")


@pytest.fixture(scope="module")
def model():
    return oai(KEYS["alice"]).models.list().data[0].id


def test_no_key_and_a_wrong_key_are_refused_and_probes_stay_open(model):
    # No key (the SDK will not send none: a plain request), then a wrong one.
    status, answer = request("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2})
    assert status == 401 and "Authorization: Bearer" in json.loads(answer)["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as e:
        oai("sk-not-a-key-000000000000").completions.create(model=model, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and "not valid" in str(e.value)
    with pytest.raises(Exception) as e:
        mistral("sk-not-a-key-000000000000").chat.complete(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "401" in str(e.value)
    for key in [None, "sk-not-a-key-000000000000"]:
        with pytest.raises(grpc.RpcError) as e:
            grpc_call(lambda i, a: i.ModelInfo, pb.ModelInfoRequest(), key)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for path in ["/health", "/livez", "/metrics"]:
        assert get(path)[0] == 200, path
    assert get("/v1/models")[0] == 401


def test_a_key_is_served_by_both_sdks_and_grpc(model):
    assert oai(KEYS["alice"]).completions.create(model=model, prompt="hi", max_tokens=2).usage.completion_tokens == 2
    m = mistral(KEYS["alice"]).chat.complete(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert m.usage.completion_tokens == 2
    assert grpc_call(lambda i, a: i.ModelInfo, pb.ModelInfoRequest(), KEYS["alice"]).model == model


def test_the_admin_api_needs_an_admin_key():
    with pytest.raises(grpc.RpcError) as e:
        grpc_call(lambda i, a: a.ClusterStatus, pb.ClusterStatusRequest(), KEYS["alice"])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in e.value.details()
    assert grpc_call(lambda i, a: a.ClusterStatus, pb.ClusterStatusRequest(), KEYS["ops"]).workers
    refused = subprocess.run([*TRAMCTL, "status", *ADDR], capture_output=True, text=True)
    assert refused.returncode != 0 and "API key" in refused.stderr
    status = subprocess.run([*TRAMCTL, "status", *ADDR, "--api-key", KEYS["ops"]], capture_output=True, text=True, check=True)
    assert "WORKER" in status.stdout


def test_requests_per_minute_run_out_with_retry_after(model):
    bob = oai(KEYS["bob"])
    for _ in range(3):
        bob.completions.create(model=model, prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        bob.completions.create(model=model, prompt="hi", max_tokens=1)
    assert "requests per minute" in str(e.value)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
    with pytest.raises(grpc.RpcError) as g:
        list(grpc_call(lambda i, a: i.Generate, pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=1)), KEYS["bob"]))
    assert g.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= int(dict(g.value.trailing_metadata())["retry-after"]) <= 60


def test_tokens_per_minute_run_out(model):
    carol = oai(KEYS["carol"])
    used = 0
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(20):
            used += carol.completions.create(model=model, prompt="The tramontane", max_tokens=30).usage.total_tokens
    assert used >= 120 and "tokens per minute" in str(e.value)


def usage_of(name):
    answer = grpc_call(lambda i, a: a.Usage, pb.UsageRequest(), KEYS["ops"])
    return next(((k.requests, k.prompt_tokens, k.cached_tokens, k.completion_tokens) for k in answer.keys if k.key == name), (0, 0, 0, 0))


def test_usage_per_key_equals_what_the_responses_reported(model):
    """A mixed run under one key (completions with n choices, chat streamed with usage and
    whole, Mistral's SDK, gRPC): the Admin Usage RPC, /metrics and `tramctl usage` give the
    sums of the responses' usage."""
    key = KEYS["alice"]
    before = usage_of("alice")
    reported = [0, 0, 0, 0]

    def add(prompt, cached, completion):
        reported[0] += 1
        reported[1] += prompt
        reported[2] += cached
        reported[3] += completion

    client = oai(key)
    for n in [1, 3]:
        u = client.completions.create(model=model, prompt="The tramontane blows over", max_tokens=5, n=n, temperature=1.0, seed=3).usage
        add(u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    chat = [{"role": "user", "content": "Where does the tramontane blow?"}]
    u = client.chat.completions.create(model=model, messages=chat, max_tokens=6).usage
    add(u.prompt_tokens, u.prompt_tokens_details.cached_tokens, u.completion_tokens)
    last = [c for c in client.chat.completions.create(model=model, messages=chat, max_tokens=7, stream=True, stream_options={"include_usage": True})][-1]
    add(last.usage.prompt_tokens, last.usage.prompt_tokens_details.cached_tokens, last.usage.completion_tokens)
    m = mistral(key).chat.complete(model=model, messages=chat, max_tokens=4)
    add(m.usage.prompt_tokens, 0, m.usage.completion_tokens)
    final = [r for r in grpc_call(lambda i, a: i.Generate, pb.GenerateRequest(text="The wind", sampling=pb.SamplingParams(max_tokens=5)), key) if r.HasField("usage")][-1]
    add(final.usage.prompt_tokens, final.usage.cached_tokens, final.usage.completion_tokens)
    after = usage_of("alice")
    got = [a - b for a, b in zip(after, before)]
    # Mistral's response does not report cached tokens; every other figure must match exactly.
    assert got[0] == reported[0] and got[1] == reported[1] and got[3] == reported[3], (got, reported)
    assert got[2] >= reported[2]
    metrics = get("/metrics")[1]
    assert f'tramontane:key_completion_tokens_total{{key="alice"}} {after[3]}' in metrics
    assert KEYS["alice"] not in metrics
    table = subprocess.run([*TRAMCTL, "usage", *ADDR, "--api-key", KEYS["ops"]], capture_output=True, text=True, check=True).stdout
    row = next(line.split() for line in table.splitlines() if line.startswith("alice"))
    assert [int(x) for x in row[1:]] == list(after)


def coordinator_pid():
    """The coordinator `tramctl up` started with this key file."""
    for proc in pathlib.Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, PermissionError):
            continue
        if cmd and cmd[0].endswith(b"coordinator") and str(KEYS_FILE).encode() in cmd:
            return int(proc.name)
    raise AssertionError("no coordinator runs with the key file")


def test_sighup_reads_the_key_file_again_without_dropping_a_stream(model):
    original = KEYS_FILE.read_text()
    dave = "sk-dave-0000000000000000005"
    with pytest.raises(openai.AuthenticationError):
        oai(dave).completions.create(model=model, prompt="hi", max_tokens=1)
    stream = oai(KEYS["alice"]).completions.create(model=model, prompt="The tramontane", max_tokens=120, stream=True)
    first = next(iter(stream))
    # dave joins and bob leaves while alice's stream runs.
    KEYS_FILE.write_text("\n".join(line for line in original.splitlines() if not line.startswith("bob")) + f"\ndave {dave}\n")
    try:
        os.kill(coordinator_pid(), signal.SIGHUP)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length" and 1 + len(rest) >= 120
        for _ in range(100):
            try:
                oai(dave).completions.create(model=model, prompt="hi", max_tokens=1)
                break
            except openai.AuthenticationError:
                threading.Event().wait(0.05)
        else:
            raise AssertionError("dave's key was not read")
        with pytest.raises(openai.AuthenticationError):
            oai(KEYS["bob"]).completions.create(model=model, prompt="hi", max_tokens=1)
    finally:
        KEYS_FILE.write_text(original)
        os.kill(coordinator_pid(), signal.SIGHUP)


def test_plain_text_clients_are_refused_over_tls(model):
    if not CA:
        pytest.skip("the client APIs serve plain text here")
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        request("/health", root=ROOT.replace("https://", "http://"))
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.InferenceStub(grpc_channel(tls=False)).ModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", f"Bearer {KEYS['alice']}")], timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # A TLS client that does not trust the CA is refused too.
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=HTTP, api_key=KEYS["alice"], max_retries=0).models.list()
