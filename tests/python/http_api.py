"""Plain HTTP calls to the cluster's API root (routes no SDK has: /tokenize, /detokenize, and
raw bodies), for the test files."""

import json
import os
import urllib.error
import urllib.request


def post(path, body):
    """POSTs JSON to the HTTP API's root (TRAMONTANE_HTTP without /v1): (status, parsed body),
    error statuses included."""
    base = os.environ["TRAMONTANE_HTTP"].removesuffix("/v1")
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def post_ok(path, body):
    """[`post`] that must answer 200: the parsed body."""
    status, answer = post(path, body)
    assert status == 200, (path, status, answer)
    return answer
