"""OpenAI-protocol details against the real server, through the official `openai` client:
usage counts, null fields, failures inside a started stream, token-id prompts that end inside
a UTF-8 character, and vLLM's /tokenize and /detokenize."""

import asyncio
import json
import shutil

import httpx
import openai
import pytest
import torch

from conftest import GPT2_TOKENIZER, post, running_server, until_metric

MODEL = "aitextgen"


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)


def test_usage_counts_each_prompt_once_whatever_n(oai):
    one = oai.completions.create(model=MODEL, prompt="ROMEO: O", max_tokens=3, seed=1)
    three = oai.completions.create(model=MODEL, prompt="ROMEO: O", max_tokens=3, n=3, seed=1)
    assert one.usage.prompt_tokens > 1
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # not x n (issue 12)
    assert three.usage.total_tokens == three.usage.prompt_tokens + three.usage.completion_tokens
    two_prompts = oai.completions.create(model=MODEL, prompt=["ROMEO: O", "ROMEO: O"],
                                         max_tokens=2, n=2, seed=1)
    assert two_prompts.usage.prompt_tokens == 2 * one.usage.prompt_tokens
    chunks = list(oai.completions.create(model=MODEL, prompt="ROMEO: O", max_tokens=3, n=3,
                                         seed=1, stream=True,
                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == one.usage.prompt_tokens


def test_continuous_usage_stats_give_each_chunk_its_choices_usage(oai):
    """vLLM's `stream_options.continuous_usage_stats` (beside `include_usage`): every chunk
    carries its choice's prompt tokens and the tokens it has so far; it was refused."""
    prompts = ["ROMEO: O", "JULIET: What"]
    lengths = [oai.completions.create(model=MODEL, prompt=p, max_tokens=1).usage.prompt_tokens
               for p in prompts]
    common = dict(model=MODEL, prompt=prompts, max_tokens=4, n=2, seed=1, stream=True,
                  extra_body={"ignore_eos": True})
    chunks = list(oai.completions.create(
        **common, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    seen: dict[int, list[int]] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        usage = chunk.usage
        assert usage.prompt_tokens == lengths[choice.index // 2]
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        seen.setdefault(choice.index, []).append(usage.completion_tokens)
    assert sorted(seen) == [0, 1, 2, 3]
    assert all(counts == sorted(counts) and counts[-1] == 4 for counts in seen.values()), seen
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    chunks = list(oai.completions.create(**common, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 16
    # vLLM's include_usage is true unless sent false: continuous_usage_stats alone gives both
    # (it gave neither)
    chunks = list(oai.completions.create(**common,
                                         stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks), chunks
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    chunks = list(oai.completions.create(
        **common, stream_options={"include_usage": False, "continuous_usage_stats": True}))
    assert chunks and all(c.usage is None and c.choices for c in chunks)


def test_best_of_is_read_as_n_is(oai):
    """best_of 2.0 beside n 2 was refused as unequal to n, where n itself takes 2.0."""
    for best_of, n in ((2.0, 2), (1.0, None), (2, 2.0)):
        r = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=1, n=n,
                                   best_of=best_of)
        assert len(r.choices) == int(n or 1)
    for best_of in (2.5, True, "2"):
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=1, n=2,
                                   best_of=best_of)
        assert e.value.body["param"] == "best_of", e.value.body


def test_null_fields_take_the_openai_defaults(oai):
    """The client sends None as JSON null. null must mean OpenAI's default: max_tokens 16,
    temperature 1, top_k off (vLLM), not the server's aitextgen defaults (256, 0.7, 50)."""
    common = dict(model=MODEL, prompt="JULIET:", seed=11, extra_body={"ignore_eos": True})
    nulls = oai.completions.create(max_tokens=None, temperature=None, top_p=None, n=None,
                                   stop=None, logprobs=None, echo=None,
                                   **{**common, "extra_body": {"ignore_eos": True,
                                                               "top_k": None}})
    assert nulls.usage.completion_tokens == 16
    explicit = oai.completions.create(max_tokens=16, temperature=1.0, top_p=1.0, **common)
    assert nulls.choices[0].text == explicit.choices[0].text
    aitextgen = oai.completions.create(max_tokens=16, temperature=0.7,
                                       **{**common, "extra_body": {"ignore_eos": True,
                                                                   "top_k": 50}})
    assert aitextgen.choices[0].text != nulls.choices[0].text
    # model null means the served model, as in vLLM; a missing prompt starts a new document
    r = post(f"{oai.base_url}completions", {"model": None, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_a_prompt_past_the_context_is_told_in_openai_s_words(oai):
    """Clients tell a prompt to shorten by OpenAI's and vLLM's "maximum context length is N
    tokens" (LiteLLM maps it to its context-window error, agents trim and retry): ours said
    "exceeds the model's context of 128", which none of them recognised."""
    for prompt, max_tokens, said in [("ROMEO:", 1000, "'max_tokens' 1000 plus the prompt's"),
                                     ("ROMEO: " * 100, 16, "prompt is ")]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens)
        error = e.value.body
        assert error["param"] == ("max_tokens" if "max_tokens" in said else "prompt"), error
        assert error["message"].startswith(said), error
        # (LiteLLM looks for the sentence as written, capital letter and all)
        assert error["message"].endswith(". This model's maximum context length is 128 tokens.")


@pytest.fixture(scope="module")
def one_slot(long_model):
    """One slot and a short queue timeout: a second prompt waits, and expires mid-stream
    (the first one's 1,000 tokens took 0.84 s on a 2-core test machine: 3x the timeout)."""
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--max_batch_size", "1", "--request_timeout", "0.25") as srv:
        yield srv


def test_a_failure_inside_a_started_stream_is_an_error_event_then_done(one_slot):
    """The stream starts with its first chunk: "a"'s echo, sent as soon as it is read, before
    "b" has waited its 0.25 s (without echo, a random model's first tokens may all be held
    bytes of a character, and "b" expire before anything was sent: then the call is a 503)."""
    body = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1000, "stream": True,
            "ignore_eos": True, "echo": True}
    with httpx.stream("POST", f"{one_slot.url}/openai/v1/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error["code"] == 503 and "waited more than 0.25s" in error["message"]
    assert error["type"] == "service_unavailable_error"
    texts = [json.loads(x[6:])["choices"][0]["text"] for x in lines[:-2]]
    assert "".join(texts)  # the first prompt had streamed before the second one expired

    client = openai.OpenAI(base_url=f"{one_slot.url}/openai/v1", api_key="unused",
                           max_retries=0)
    stream = client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=1000,
                                       stream=True, echo=True,
                                       extra_body={"ignore_eos": True})
    got = []
    with pytest.raises(openai.APIError, match="waited more than 0.25s"):
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert "".join(got)


def test_queue_timeout_without_a_stream_is_a_503_in_openai_shape(one_slot):
    r = post(f"{one_slot.url}/openai/v1/completions",
             {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1000, "ignore_eos": True})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "service_unavailable_error"


def test_a_stream_that_never_gets_a_slot_is_a_503_too(one_slot):
    """Its response starts with its first chunk: a stream whose one prompt waited past
    --request_timeout was a 200 whose stream then said 503, with no Retry-After."""
    busy = {"model": MODEL, "prompt": "a", "max_tokens": 1000, "ignore_eos": True}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            first = asyncio.create_task(
                client.post(f"{one_slot.url}/openai/v1/completions", json=busy))
            await until_metric(client, one_slot, "gpt2serve_running_sequences", 1)
            r = await client.post(f"{one_slot.url}/openai/v1/completions", json={
                "model": MODEL, "prompt": "b", "max_tokens": 4, "stream": True})
            first.cancel()
            return r

    r = asyncio.run(scenario())
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    error = r.json()["error"]
    assert error["type"] == "service_unavailable_error" and "waited more than" in error["message"]


# ---- token-id prompts that end inside a character ---------------------------------------

def make_scripted_gpt2(folder, prompt_len: int, continuation: list[int]):
    """A real GPT-2 checkpoint with GPT-2's tokenizer whose greedy continuation of any prompt
    of `prompt_len` tokens is `continuation`: blocks zeroed, so the last hidden state is
    token + position embedding; position p's embedding points at the token to predict there
    and outweighs the input token's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd = 64
    positions = range(prompt_len - 1, prompt_len - 1 + len(continuation))
    cfg = GPT2Config(vocab_size=50257, n_positions=32, n_embd=n_embd, n_layer=1, n_head=4,
                     bos_token_id=50256, eos_token_id=50256)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" not in name:
                p.zero_()
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        for dim, (pos, token) in enumerate(zip(positions, continuation)):
            wte[token, dim] = 1.0
            wpe[pos, dim] = 10.0
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_TOKENIZER / name, folder / name)
    return folder


def test_token_prompt_ending_inside_a_character_continues_it(tmp_path):
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer not available")
    from gpt2serve.tokenizer import Tokenizer

    gpt2 = Tokenizer.from_dir(GPT2_TOKENIZER)
    e4, b8, ad = (gpt2._tok.token_to_id(c) for c in "ä¸Ń")  # GPT-2's byte-level symbols
    prompt = gpt2.encode("Hello ") + [e4]  # ends after the first byte of '中' (e4 b8 ad)
    continuation = [b8, ad, *gpt2.encode("文"), gpt2.eos_id]
    folder = make_scripted_gpt2(tmp_path / "gpt2", len(prompt), continuation)
    with running_server("--model_dir", str(folder), "--enable_grpc", "false",
                        "--max_batch_size", "2") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/openai/v1", api_key="unused")
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert r.choices[0].text == "中文"  # was '\ufffd\ufffd文'
        assert r.choices[0].finish_reason == "stop"
        deltas = [c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)]
        assert "".join(deltas) == "中文" and not any("\ufffd" in d for d in deltas)


def test_a_prompt_ending_in_a_replacement_character_of_its_own_keeps_it(tmp_path):
    """A string prompt may end in U+FFFD, a whole character: the completion is the model's
    text alone, not that character again (it began ' \ufffd ok'), and the echo keeps it."""
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer not available")
    from gpt2serve.tokenizer import Tokenizer

    gpt2 = Tokenizer.from_dir(GPT2_TOKENIZER)
    prompt = "Hello \ufffd"
    folder = make_scripted_gpt2(tmp_path / "gpt2", len(gpt2.encode(prompt)),
                                [*gpt2.encode(" ok"), gpt2.eos_id])
    with running_server("--model_dir", str(folder), "--enable_grpc", "false",
                        "--max_batch_size", "2") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/openai/v1", api_key="unused")
        kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        assert client.completions.create(**kw).choices[0].text == " ok"
        assert "".join(c.choices[0].text for c in client.completions.create(
            stream=True, **kw)) == " ok"
        assert client.completions.create(echo=True, **kw).choices[0].text == prompt + " ok"


def test_echo_and_offsets_of_a_prompt_ending_inside_a_character(tmp_path):
    """Echoed, such a prompt stops before the character its completion finishes ('Hello '
    then '中文', not 'Hello \ufffd中文'); text_offset counts that character once, and a
    character left unfinished as one U+FFFD before the token after it. With max_tokens 0
    there is no completion to finish it: the prompt is echoed whole, U+FFFD at its end."""
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer not available")
    from gpt2serve.tokenizer import Tokenizer

    gpt2 = Tokenizer.from_dir(GPT2_TOKENIZER)
    e4, b8, ad = (gpt2._tok.token_to_id(c) for c in "ä¸Ń")
    prompt = gpt2.encode("Hello ") + [e4]
    wen, a = gpt2.encode("文"), gpt2.encode("A")
    continuation = [b8, ad, *wen, e4, *a, gpt2.eos_id]  # 中文, then e4 left unfinished, A
    folder = make_scripted_gpt2(tmp_path / "gpt2", len(prompt), continuation)
    with running_server("--model_dir", str(folder), "--enable_grpc", "false",
                        "--max_batch_size", "2") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/openai/v1", api_key="unused")
        kw = dict(model=MODEL, prompt=prompt, temperature=0, echo=True, logprobs=0)
        choice = client.completions.create(max_tokens=10, **kw).choices[0]
        assert choice.text == "Hello 中文\ufffdA" and choice.finish_reason == "stop"
        offsets = choice.logprobs.text_offset
        assert offsets[len(prompt) - 1:] == [6, 6, 6, *[7] * len(wen), 8, 9, 10]
        chunks = list(client.completions.create(max_tokens=10, stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == choice.text
        assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == offsets
        scored = client.completions.create(max_tokens=0, **kw).choices[0]
        assert scored.text == "Hello \ufffd" and scored.logprobs.text_offset[-1] == 6
        chunks = list(client.completions.create(max_tokens=0, stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == scored.text
        # <|endoftext|> after the unfinished character: the completion's text skips special
        # tokens, so the echo keeps the prompt whole
        kw["prompt"] = prompt + [gpt2.eos_id]
        eos_after = client.completions.create(max_tokens=1, **kw).choices[0]
        assert eos_after.text.startswith("Hello \ufffd<|endoftext|>")


@pytest.mark.parametrize("sampled", ["byte", "word"])
def test_top_logprobs_keep_the_likeliest_of_tokens_that_read_the_same(tmp_path, sampled):
    """Two tokens that are each one byte of a UTF-8 character both read as U+FFFD (as in
    vLLM), so they share a key of a top_logprobs entry: the one written last, the less likely,
    gave its value. Sampled itself ("byte"), the token keeps its own value under that key, as
    token_logprobs has it; behind a likelier word ("word"), the key holds the likelier byte's
    logprob, as transformers computes it."""
    if not GPT2_TOKENIZER.exists():
        pytest.skip("../shared/data/gpt2-tokenizer not available")
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    from gpt2serve.tokenizer import Tokenizer

    gpt2 = Tokenizer.from_dir(GPT2_TOKENIZER)
    e4, b8 = (gpt2._tok.token_to_id(c) for c in "ä¸")  # bytes 0xE4 and 0xB8
    word = gpt2.encode(" world")[0]
    prompt = gpt2.encode("Hello")
    first = e4 if sampled == "byte" else word
    folder = make_scripted_gpt2(tmp_path / "gpt2", len(prompt), [first])
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    for token, weight in ((e4, 0.9), (b8, 0.8)):  # below `first`'s 1.0
        tensors["transformer.wte.weight"][token, 0] = max(
            weight, tensors["transformer.wte.weight"][token, 0])
    save_file(tensors, weights, metadata={"format": "pt"})
    with torch.no_grad():
        reference = GPT2LMHeadModel.from_pretrained(folder)(torch.tensor([prompt])).logits
    expected = torch.log_softmax(reference[0, -1].double(), -1)
    with running_server("--model_dir", str(folder), "--enable_grpc", "false",
                        "--max_batch_size", "2") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/openai/v1", api_key="unused")
        logprobs = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                             temperature=0, logprobs=3).choices[0].logprobs
    (top,) = logprobs.top_logprobs
    if sampled == "byte":
        assert logprobs.tokens == ["\ufffd"]
        assert top["\ufffd"] == logprobs.token_logprobs[0]
    else:
        assert logprobs.tokens == [" world"] and set(top) == {" world", "\ufffd"}
        assert top["\ufffd"] == pytest.approx(float(expected[e4]), abs=1e-4)
        assert float(expected[e4]) - float(expected[b8]) > 0.5  # (which the old value was)


# ---- /tokenize and /detokenize (vLLM's shapes) --------------------------------------------

@pytest.mark.parametrize("prefix", ["", "/openai/v1"])
def test_tokenize_and_detokenize_round_trip(server, prefix):
    text = "ROMEO: héllo wörld"
    r = post(f"{server.url}{prefix}/tokenize", {"model": MODEL, "prompt": text,
                                                "return_token_strs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) > 1
    assert out["max_model_len"] == 128  # the tiny model's context
    assert "".join(out["token_strs"]).replace("Ġ", " ") != text  # byte-level symbols
    # the same ids the completions route counts for this prompt
    usage = post(f"{server.url}/openai/v1/completions",
                 {"prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == out["count"]
    plain = post(f"{server.url}{prefix}/tokenize", {"prompt": text}).json()
    assert plain["tokens"] == out["tokens"] and "token_strs" not in plain
    back = post(f"{server.url}{prefix}/detokenize", {"tokens": out["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_the_completion_schema_names_every_field_the_route_takes():
    """The route takes the fields of MAPPED, IGNORED and NEUTRAL; /openapi.json lists
    COMPLETION_FIELDS (test_server checks over HTTP that the route takes each of those)."""
    from gpt2serve.server.openai import COMPLETION_FIELDS, IGNORED, MAPPED, NEUTRAL

    assert set(COMPLETION_FIELDS) == set(MAPPED) | IGNORED | set(NEUTRAL)


def test_token_ids_sent_as_floats_of_integer_value_are_taken_as_integers_are(server):
    """JSON does not tell 1 from 1.0, and neither did any integer parameter here (max_tokens
    2.0 was taken) but token ids: a prompt, /detokenize's tokens and stop_token_ids of 1.0
    were refused (found by schemathesis: JSON Schema calls 1.0 an integer)."""
    ids = post(f"{server.url}/tokenize", {"prompt": "ROMEO: hello"}).json()["tokens"]
    floats = [float(t) for t in ids]
    back = post(f"{server.url}/detokenize", {"tokens": floats})
    assert back.status_code == 200 and back.json() == {"prompt": "ROMEO: hello"}, back.text
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    want = post(f"{server.url}/openai/v1/completions", {"prompt": ids, **greedy}).json()
    for prompt in (floats, [floats, ids]):
        got = post(f"{server.url}/openai/v1/completions", {"prompt": prompt, **greedy}).json()
        assert [c["text"] for c in got["choices"]][0] == want["choices"][0]["text"], got
    forced = {"7": 100}  # every token is 7
    for stop_ids in ([7], [7.0]):
        got = post(f"{server.url}/openai/v1/completions",
                   {"prompt": ids, **greedy, "logit_bias": forced, "stop_token_ids": stop_ids})
        assert got.json()["choices"][0]["finish_reason"] == "stop", got.text
        assert got.json()["usage"]["completion_tokens"] == 1, got.text
    r = post(f"{server.url}/detokenize", {"tokens": [1.5]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens", r.text
    # an integer's value, but no token's: its 301 digits came back in the message
    r = post(f"{server.url}/openai/v1/completions", {"prompt": "a", "stop_token_ids": [1e300]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    assert len(r.json()["error"]["message"]) < 100, r.text


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "bogus": 1}, 400, "bogus"),
    ("/detokenize", {"tokens": [10 ** 6]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/openai/v1/detokenize", {"tokens": [-1]}, 400, "tokens"),
])
def test_tokenizer_route_errors(server, path, body, status, param):
    r = post(f"{server.url}{path}", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == status
