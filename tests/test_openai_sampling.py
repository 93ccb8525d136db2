"""OpenAI's and vLLM's sampling fields through the official `openai` client against the real
server: logit_bias, presence and frequency penalties, min_tokens, stop_token_ids,
include_stop_str_in_output, ignore_eos (generate past EOS, as vLLM), and echo with logprobs
scoring the prompt (checked against transformers). The tiny model's EOS is token 0."""

import math

import openai
import pytest
import torch
from conftest import metric
from transformers import GPT2LMHeadModel

MODEL = "aitextgen"
EOS = 0
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused", max_retries=0)


def tokens_of(choice) -> list[str]:
    return choice.logprobs.tokens


def complete(oai, **fields):
    extra = {k: fields.pop(k) for k in ("min_tokens", "stop_token_ids", "ignore_eos",
                                        "include_stop_str_in_output") if k in fields}
    return oai.completions.create(model=MODEL, prompt=fields.pop("prompt", "ROMEO: O"),
                                  extra_body=extra, **{**GREEDY, **fields}).choices[0]


def test_logit_bias_forces_and_forbids_tokens(oai):
    plain = complete(oai, max_tokens=6, logprobs=0, ignore_eos=True)
    favourite = plain.logprobs.tokens[0]
    forced = complete(oai, max_tokens=4, logprobs=0, logit_bias={"7": 100}, ignore_eos=True)
    assert forced.text and len(set(tokens_of(forced))) == 1
    first_id = oai.post("/tokenize", body={"prompt": favourite}, cast_to=object)["tokens"][0]
    banned = complete(oai, max_tokens=6, logprobs=0, ignore_eos=True,
                      logit_bias={str(first_id): -100})
    assert banned.logprobs.tokens[0] != favourite


def test_min_tokens_holds_eos_back_and_ignore_eos_generates_past_it(oai):
    eos_first = {str(EOS): 100}
    assert complete(oai, max_tokens=8, logit_bias=eos_first).finish_reason == "stop"
    # end-of-text is a completion token with its logprob, as in OpenAI's and vLLM's answers
    assert complete(oai, max_tokens=8, logit_bias=eos_first, logprobs=0).logprobs.tokens == [
        "<|endoftext|>"]
    held = complete(oai, max_tokens=8, logit_bias=eos_first, min_tokens=5, logprobs=0)
    assert len(held.logprobs.tokens) == 6 and held.finish_reason == "stop"
    assert held.logprobs.tokens[-1] == "<|endoftext|>"
    past = complete(oai, max_tokens=6, logit_bias=eos_first, ignore_eos=True, logprobs=0)
    # vLLM's meaning: EOS no longer ends the sequence; it is generated like any token
    assert past.finish_reason == "length" and len(past.logprobs.tokens) == 6


def test_stop_token_ids_and_include_stop_str_in_output(oai):
    forced = {"7": 100}
    stopped = complete(oai, max_tokens=8, logit_bias=forced, stop_token_ids=[7])
    assert stopped.text == "" and stopped.finish_reason == "stop"
    kept = complete(oai, max_tokens=8, logit_bias=forced, stop_token_ids=[7],
                    include_stop_str_in_output=True)
    one = complete(oai, max_tokens=1, logit_bias=forced)
    assert kept.text == one.text != "" and kept.finish_reason == "stop"
    text = complete(oai, max_tokens=12, ignore_eos=True).text
    stop = text[3:5]
    cut = complete(oai, max_tokens=12, ignore_eos=True, stop=[stop])
    with_stop = complete(oai, max_tokens=12, ignore_eos=True, stop=[stop],
                         include_stop_str_in_output=True)
    assert cut.text == text[:text.index(stop)]
    assert with_stop.text == cut.text + stop


def test_stop_strings_that_end_within_min_tokens_do_not_count(oai):
    """As vLLM's: a stop string in the first min_tokens tokens' text was cutting the text
    there, though min_tokens holds back EOS and stop tokens until then."""
    plain = complete(oai, max_tokens=24, ignore_eos=True, logprobs=0)
    text, offsets = plain.text, plain.logprobs.text_offset

    def token_at(i: int) -> int:
        return max(t for t, at in enumerate(offsets) if at <= i)

    # a character in the text of two tokens: the stop string, first found in token `first`
    at, stop = next((i, c) for i, c in enumerate(text) if token_at(text.rfind(c)) > token_at(i))
    first = token_at(at)
    cut = complete(oai, max_tokens=24, ignore_eos=True, stop=[stop])
    assert cut.text == text[:at] and cut.finish_reason == "stop"
    held = complete(oai, max_tokens=24, ignore_eos=True, stop=[stop], min_tokens=first + 1)
    later = text.find(stop, offsets[first + 1])  # in a token after the first min_tokens
    assert held.text == text[:later] and held.finish_reason == "stop", (stop, first, text)


def test_presence_and_frequency_penalties_follow_openais_formula(oai):
    """Greedy with a heavy frequency penalty cannot keep choosing one token: each use costs
    it 2 logits. The first token, before any penalty applies, is the same."""
    plain = complete(oai, max_tokens=24, logprobs=0, ignore_eos=True, logit_bias={"7": 3})
    penalised = complete(oai, max_tokens=24, logprobs=0, ignore_eos=True, logit_bias={"7": 3},
                         frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.logprobs.tokens[0] == penalised.logprobs.tokens[0]
    assert (penalised.logprobs.tokens.count(plain.logprobs.tokens[0])
            < plain.logprobs.tokens.count(plain.logprobs.tokens[0]))


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}),
                                         ("logit_bias", {"99999": 1}), ("min_tokens", -1),
                                         ("stop_token_ids", [99999]),
                                         ("include_stop_str_in_output", "yes")])
def test_bad_sampling_fields_are_a_400_naming_them(oai, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="a", max_tokens=2,
                               extra_body={field: value})
    assert field in str(e.value)


def test_echo_with_logprobs_scores_the_prompt_as_transformers_does(oai, tiny_model):
    prompt = "ROMEO: But soft"
    ids = oai.post("/tokenize", body={"prompt": prompt}, cast_to=object)["tokens"]
    choice = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True,
                                    logprobs=2, **GREEDY).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 and choice.text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = GPT2LMHeadModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].log_softmax(-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
        # the 2 likeliest, and the prompt's own token when it is not one of them (OpenAI)
        assert lp.tokens[i] in lp.top_logprobs[i]
        assert len(lp.top_logprobs[i]) == 2 + (lp.token_logprobs[i] < sorted(
            lp.top_logprobs[i].values())[-2] - 1e-6)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(
            float(expected[i - 1].max()), abs=1e-4)
    assert all(isinstance(x, float) and math.isfinite(x) for x in lp.token_logprobs[1:])
    stream = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True,
                                         logprobs=2, stream=True, **GREEDY))
    assert stream[0].choices[0].text == prompt
    assert stream[0].choices[0].logprobs.token_logprobs == lp.token_logprobs[:len(ids)]
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text


def test_each_of_n_echoed_choices_scores_the_prompt_and_then_its_own_tokens(oai):
    """n > 1 with echo and logprobs: every choice begins with the prompt's tokens and
    logprobs (scored once for all of them), then its own completion's, as the stream sends."""
    prompt = "ROMEO: But soft"
    ids = oai.post("/tokenize", body={"prompt": prompt}, cast_to=object)["tokens"]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=4, echo=True, logprobs=1, n=3,
              temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    choices = sorted(oai.completions.create(**kw).choices, key=lambda c: c.index)
    head = choices[0].logprobs
    for c in choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + 4 and c.text.startswith(prompt)
        assert lp.tokens[:len(ids)] == head.tokens[:len(ids)]
        assert lp.token_logprobs[:len(ids)] == head.token_logprobs[:len(ids)]
        assert lp.text_offset[len(ids)] == len(prompt)
    assert len({c.text for c in choices}) > 1  # their own tokens after the prompt
    streamed = {}
    for chunk in oai.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in choices}


def test_echo_with_max_tokens_0_scores_a_prompt_that_fills_the_context(oai, tiny_model):
    """OpenAI's and vLLM's way to score text (lm-evaluation-harness's loglikelihood): echo
    with max_tokens 0 generates nothing, so the prompt may take the whole context (128)."""
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east. " * 8
    ids = oai.post("/tokenize", body={"prompt": text}, cast_to=object)["tokens"][:128]
    assert len(ids) == 128
    with pytest.raises(openai.BadRequestError, match="context"):  # one token would not fit
        oai.completions.create(model=MODEL, prompt=ids, max_tokens=1)
    answer = oai.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                    logprobs=1)
    choice, lp = answer.choices[0], answer.choices[0].logprobs
    assert choice.finish_reason == "length" and choice.text == "".join(lp.tokens)
    assert answer.usage.prompt_tokens == 128 and answer.usage.completion_tokens == 0
    assert len(lp.tokens) == 128 and lp.token_logprobs[0] is None
    ref = GPT2LMHeadModel.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert lp.token_logprobs[1:] == pytest.approx(
        [float(expected[i - 1, ids[i]]) for i in range(1, 128)], abs=1e-4)
    stream = list(oai.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True,
                                         logprobs=1, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "length"
    assert stream[-1].usage.completion_tokens == 0
    # without echo, nothing at all; with min_tokens, a contradiction named
    assert oai.completions.create(model=MODEL, prompt="a", max_tokens=0).choices[0].text == ""
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        complete(oai, prompt="a", max_tokens=0, echo=True, min_tokens=1)


def test_scoring_n_prompts_generates_no_token_and_no_first_token_latency(oai, server):
    """A max_tokens 0 call reads its prompt and stops: it counts prompt tokens but neither
    generated tokens nor a time to first token, whatever its n."""
    names = ("gpt2serve_generated_tokens_total", "gpt2serve_time_to_first_token_seconds_count",
             "gpt2serve_prompt_tokens_total")
    before = [metric(server, name) for name in names]
    answer = oai.completions.create(model=MODEL, prompt="ROMEO: O", max_tokens=0, echo=True,
                                    logprobs=0, n=2)
    assert [c.text for c in answer.choices] == ["ROMEO: O"] * 2
    assert answer.choices[0].logprobs == answer.choices[1].logprobs
    after = [metric(server, name) for name in names]
    assert after[:2] == before[:2] and after[2] > before[2]


def test_echo_gives_the_prompt_as_sent_with_its_special_tokens(oai):
    """As vLLM: a string prompt comes back as sent, `<|endoftext|>` in it included (it was
    read as that token), and each token's text_offset is where it starts in that text."""
    prompt = "ROMEO: O<|endoftext|>JULIET: Ay"
    choice = complete(oai, prompt=prompt, max_tokens=2, echo=True, logprobs=0,
                      ignore_eos=True)
    lp = choice.logprobs
    assert choice.text.startswith(prompt) and "<|endoftext|>" in lp.tokens
    for token, at in zip(lp.tokens, lp.text_offset):
        assert choice.text[at:at + len(token)] == token
    ids = oai.post("/tokenize", body={"prompt": prompt}, cast_to=object)["tokens"]
    as_ids = complete(oai, prompt=ids, max_tokens=2, echo=True, logprobs=0, ignore_eos=True)
    assert as_ids.text == choice.text and as_ids.logprobs.text_offset == lp.text_offset
    # an empty prompt is read as <|endoftext|>, and echoed as what was read
    empty = complete(oai, prompt="", max_tokens=2, echo=True, logprobs=0, ignore_eos=True)
    assert empty.text.startswith("<|endoftext|>") and empty.logprobs.tokens[0] == "<|endoftext|>"
    assert empty.logprobs.text_offset[:2] == [0, len("<|endoftext|>")]
