"""Every request field of the pinned SDKs' schemas is honoured or refused, never ignored.

The fields are read from the SDKs themselves (openai's request TypedDicts, mistralai's
request models), so a field an SDK adds shows up here. A field the server honours names the
test that shows its effect; any other must be refused, at a value that would change
something, with a 400 whose `param` names it. Run by tests/tests/python_clients.rs (see
test_clients.py for the environment it passes).
"""

import pathlib
import typing

import pytest
from http_api import post
from mistralai.client import models as mistral_models
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

HERE = pathlib.Path(__file__).parent
TESTS = "".join((HERE / f).read_text() for f in ["test_clients.py", "test_mistral.py", "test_structured.py"])

# Honoured fields, each with the test that shows its effect (or, for `user`, that it is the
# client's own metadata and changes nothing).
COMMON = {
    "model": "test_bad_input_is_a_400_naming_the_field",
    "max_tokens": "test_completion_reproduces_transformers",
    "temperature": "test_seeded_sampling_is_reproducible",
    "top_p": "test_seeded_sampling_is_reproducible",
    "seed": "test_n_choices_draw_with_consecutive_seeds",
    "stop": "test_stop_strings_end_the_text_over_http_and_grpc",
    "n": "test_n_choices_draw_with_consecutive_seeds",
    "stream": "test_streamed_completion_equals_the_whole_one",
    "stream_options": "test_n_choices_draw_with_consecutive_seeds",
    "presence_penalty": "test_penalties_over_http_and_grpc_agree",
    "frequency_penalty": "test_penalties_over_http_and_grpc_agree",
    "logit_bias": "test_logit_bias_min_tokens_ignore_eos_and_special_tokens",
    "user": "test_seeded_sampling_is_reproducible",
}
HONOURED = {
    "openai completions": COMMON | {
        "prompt": "test_completion_reproduces_transformers",
        "echo": "test_echo_scores_the_prompt_as_transformers_does",
        "logprobs": "test_completion_reproduces_transformers",
        "suffix": "test_fim_fills_the_middle_or_is_refused",
    },
    "openai chat": COMMON | {
        "messages": "test_chat_streamed_and_whole_agree",
        "max_completion_tokens": "test_chat_logprobs_and_its_token_limit",
        "logprobs": "test_chat_logprobs_and_its_token_limit",
        "top_logprobs": "test_chat_logprobs_and_its_token_limit",
        "response_format": "test_json_schemas_hold_through_the_openai_sdk",
        "tools": "test_required_tool_calls_are_valid_calls_through_the_openai_sdk",
        "tool_choice": "test_required_tool_calls_are_valid_calls_through_the_openai_sdk",
        "parallel_tool_calls": "test_a_tool_round_trip",
    },
    "mistral chat": COMMON | {
        "messages": "test_chat_answers_as_the_openai_api_does",
        "random_seed": "test_chat_answers_as_the_openai_api_does",
        "safe_prompt": "test_safe_prompt_puts_the_guardrail_first",
        "min_tokens": "test_logit_bias_min_tokens_ignore_eos_and_special_tokens",
        "repetition_penalty": "test_penalties_over_http_and_grpc_agree",
        "top_k": "test_top_k_1_is_greedy",
        "logprobs": "test_chat_logprobs_and_its_token_limit",
        "top_logprobs": "test_chat_logprobs_and_its_token_limit",
        "response_format": "test_json_schemas_hold_through_the_mistral_sdk_streamed_or_not",
        "tools": "test_any_and_named_tool_calls_through_the_mistral_sdk",
        "tool_choice": "test_any_and_named_tool_calls_through_the_mistral_sdk",
        "parallel_tool_calls": "test_any_and_named_tool_calls_through_the_mistral_sdk",
    },
    "mistral fim": COMMON | {
        "prompt": "test_fim_fills_the_middle_or_is_refused",
        "suffix": "test_fim_fills_the_middle_or_is_refused",
        "random_seed": "test_chat_answers_as_the_openai_api_does",
        "min_tokens": "test_logit_bias_min_tokens_ignore_eos_and_special_tokens",
    },
}
SCHEMAS = {
    "openai completions": ("/v1/completions", typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)),
    "openai chat": ("/v1/chat/completions", typing.get_type_hints(chat_create_params.CompletionCreateParamsBase)),
    "mistral chat": ("/v1/chat/completions", mistral_models.ChatCompletionRequest.model_fields),
    "mistral fim": ("/v1/fim/completions", mistral_models.FIMCompletionRequest.model_fields),
}
# A value of each refused field that would change what the server does (where the server
# takes a neutral value, such as an empty tool list, this is not one).
PROBES = {
    "best_of": 2,
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "required",
    "response_format": {"type": "json_object"},
    "parallel_tool_calls": "yes",
    "prompt_logprobs": 1,
    "top_prompt_logprobs": 1,
}
BASE = {
    "openai completions": {"prompt": "hi", "max_tokens": 2},
    "openai chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "mistral chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "mistral fim": {"prompt": "def f(", "suffix": "", "max_tokens": 2},
}




def fields():
    for schema, (_, names) in SCHEMAS.items():
        for name in sorted(names):
            yield schema, name


@pytest.mark.parametrize("schema, field", list(fields()), ids=lambda v: str(v))
def test_every_field_is_honoured_or_refused(schema, field):
    honoured = HONOURED[schema].get(field)
    if honoured:
        assert f"def {honoured}(" in TESTS, f"{schema} `{field}`: no test {honoured}"
        return
    path, _ = SCHEMAS[schema]
    status, body = post(path, {**BASE[schema], field: PROBES.get(field, {"probe": 1})})
    assert status == 400 and body["error"]["param"] == field, (schema, field, status, body)


def test_the_table_of_fields():
    """Prints the honoured / refused table (the issue's note quotes it)."""
    for schema, (_, names) in SCHEMAS.items():
        honoured = sorted(n for n in names if n in HONOURED[schema])
        refused = sorted(n for n in names if n not in HONOURED[schema])
        print(f"{schema}: honoured {', '.join(honoured)}; refused {', '.join(refused)}")
        assert honoured and set(honoured) | set(refused) == set(names)
