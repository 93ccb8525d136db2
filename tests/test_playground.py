"""The playground page (`GET /playground`) in a real headless Chromium, against a real server
process serving the embedded demo model with an API key.

The browser is Debian's `chromium` driven through `chromium-driver` (`make test` installs both
when it runs as root); Selenium is given both paths, so it downloads nothing. Where no Chromium
can be found the browser tests skip, and the others here still run. Screenshots go to
test-artifacts/ (or $GPT2SERVE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ServerProcess, free_port, make_hf_model, metric, post, running_server

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("GPT2SERVE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
AXE_DIR = ROOT / "build" / "npm"
AXE_VERSION = "4.14.1"  # the Makefile installs the same
AXE_JS = AXE_DIR / "node_modules" / "axe-core" / "axe.min.js"
KEY = "playground-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "aitextgen"
MISSING_KEY = ("missing or wrong API key: send 'Authorization: Bearer KEY' (gRPC: metadata "
               "'authorization')")
DESKTOP, PHONE = (1280, 900), (390, 844)


def find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


CHROMIUM = find("/usr/bin/chromium", "chromium", "chromium-browser")
CHROMEDRIVER = find("/usr/bin/chromedriver", "chromedriver")
NO_BROWSER = ("no headless Chromium: install Debian's chromium and chromium-driver "
              "(`make test` does, as root)")


@pytest.fixture(scope="module")
def srv():
    with running_server("--enable_grpc", "false", "--max_batch_size", "8", "--api_key", KEY,
                        headers=AUTH) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--lang=en-US", f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def page(srv, driver):
    """The page, fresh, at desktop width, with the API key typed in (it is kept in storage)."""
    open_page(driver, srv)
    type_into(driver, "api_key", KEY + "\t")  # the change event stores it and reloads the model
    wait(driver, lambda d: MODEL in d.find_element("id", "model").text)
    return driver


def open_page(driver, srv) -> None:
    """The page, fresh, at desktop width, with no key in the tab's storage."""
    driver.set_window_size(*DESKTOP)
    driver.get(f"{srv.url}/playground")
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()


def el(driver, id_: str):
    return driver.find_element("id", id_)


def type_into(driver, id_: str, text: str) -> None:
    field = el(driver, id_)
    field.clear()
    field.send_keys(text)


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def state(driver) -> str:
    return el(driver, "status").get_attribute("data-state")


def samples(driver) -> list[str]:
    return [e.get_attribute("textContent")
            for e in driver.find_elements("css selector", ".sample .generated")]


def set_params(driver, **values) -> None:
    for name, value in values.items():
        type_into(driver, name, str(value))


def generate(driver, prompt: str, **params) -> str:
    """Type a prompt, set the parameters, press Generate and wait for the run to end; the
    state it ended in."""
    type_into(driver, "prompt", prompt)
    set_params(driver, **params)
    el(driver, "generate").click()
    wait(driver, lambda d: state(d) != "streaming")
    return state(driver)


def aborted(srv) -> float:
    return metric(srv, "gpt2serve_aborted_sequences_total", model=MODEL)


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


# ---- without a browser ----

def test_page_and_assets_load_without_the_key(srv):
    r = httpx.get(f"{srv.url}/playground")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    blob = json.loads(re.search(r'<script id="settings" type="application/json">(.*?)</script>',
                                r.text).group(1))
    assert blob["context"] == 256 and blob["max_n"] == 8  # the demo model; --max_batch_size 8
    assert MODEL not in r.text  # the model's name comes from the API, with the key
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        asset = httpx.get(f"{srv.url}/playground/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    assert not re.search(r'(src|href)="(https?:)?//', r.text)  # nothing from elsewhere
    assert httpx.get(f"{srv.url}/playground/other.js").status_code == 401  # only those open
    assert httpx.get(f"{srv.url}/openai/v1/models").status_code == 401
    assert "/playground" not in httpx.get(f"{srv.url}/openapi.json", headers=AUTH).text


def test_limits_on_the_page_are_the_servers(srv):
    """Each bound the page shows is accepted by the server and one step past it is refused."""
    blob = json.loads(re.search(r'application/json">(.*?)</script>',
                                httpx.get(f"{srv.url}/playground").text).group(1))
    url = f"{srv.url}/openai/v1/completions"
    base = {"prompt": "A", "max_tokens": 1, "stop": [" ", "\n"]}  # short either way
    for name, (lo, hi) in blob["limits"].items():
        step = 0.001 if name in ("temperature", "top_p", "repetition_penalty") else 1
        if name in blob["low_open"]:  # (lo, hi]
            inside, outside = [lo + step], [lo]
        else:
            inside, outside = [lo], [lo - step]
        if hi is not None:
            inside, outside = inside + [hi], outside + [hi + step]
        for value in inside:
            # An empty prompt is one token (<|endoftext|>), so max_tokens may be context - 1.
            r = post(url, {**base, name: value, "prompt": ""}, AUTH)
            assert r.status_code == 200, (name, value, r.text)
        for value in outside:
            r = post(url, {**base, name: value}, AUTH)
            assert r.status_code == 400, (name, value, r.text)


def test_serve_logs_the_playground_url(tiny_model, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir",
                                 str(tiny_model), "--http_port", str(port), "--grpc_port",
                                 str(free_port()), "--enable_grpc", "false"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while f"http://localhost:{port}/playground" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- in the browser ----

# Records the first sample's length at every change of the page, in the browser: polled from
# the test, a fast machine finished the 120 tokens between two looks.
RECORD_LENGTHS = """
window.lengthsSeen = [];
window.lengthsObserver = new MutationObserver(() => {
  const generated = document.querySelector('.sample .generated');
  const seen = window.lengthsSeen, n = generated ? generated.textContent.length : 0;
  if (n && seen[seen.length - 1] !== n) seen.push(n);
});
window.lengthsObserver.observe(document.body, {childList: true, subtree: true,
                                               characterData: true});
"""


def test_generate_streams_text_then_finishes(srv, page):
    type_into(page, "prompt", "ROMEO:")
    set_params(page, max_tokens=120, seed=11)
    el(page, "ignore_eos").click()  # all 120 tokens, whatever the model samples
    page.execute_script(RECORD_LENGTHS)
    el(page, "generate").click()
    while state(page) in ("idle", "streaming"):
        time.sleep(0.05)
    lengths = page.execute_script("window.lengthsObserver.disconnect(); return window.lengthsSeen;")
    assert state(page) == "done", el(page, "error").text
    final = samples(page)[0]
    # Seen while streaming: some text, then more, then more (at least two updates).
    assert lengths == sorted(lengths) and len(lengths) >= 3, lengths
    assert lengths[-1] <= len(final)
    assert el(page, "generate").is_enabled() and not el(page, "stop").is_enabled()
    assert re.fullmatch(r"\d+ ms", el(page, "ttft").text)
    assert float(el(page, "tps").text) > 0
    assert el(page, "ntokens").text == "120"  # the server's usage count
    assert re.fullmatch(r"\d+% of \d+", el(page, "cached").text)  # prefix-cache hit rate
    # What streamed is what the server generates for these parameters (same seed, V1 route).
    body = {"instances": [{"prompt": "ROMEO:", "max_new_tokens": 120, "seed": 11,
                           "temperature": 0.7, "top_k": 50, "top_p": 1.0,
                           "repetition_penalty": 1.0, "ignore_eos": True}]}
    r = post(f"{srv.url}/v1/models/{MODEL}:predict", body, AUTH)
    assert r.json()["predictions"][0] == "ROMEO:" + final


def test_stop_cancels_on_the_server(srv, page):
    before = aborted(srv)
    type_into(page, "prompt", "JULIET:")
    set_params(page, max_tokens=250, n=4)
    el(page, "ignore_eos").click()  # so all 4 run 250 tokens unless stopped
    el(page, "generate").click()
    wait(page, lambda d: len("".join(samples(d))) > 0)
    assert state(page) == "streaming"
    el(page, "stop").click()
    wait(page, lambda d: state(d) == "stopped", 10)
    stopped_at = samples(page)
    deadline = time.monotonic() + 15
    while aborted(srv) < before + 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert aborted(srv) == before + 4  # the server dropped all four sequences
    assert int(el(page, "ntokens").text) < 4 * 250
    time.sleep(0.5)
    assert samples(page) == stopped_at and el(page, "status").text == "Stopped"
    assert not el(page, "error").is_displayed()
    # each sample says it was cut short (it said nothing)
    assert [e.text for e in page.find_elements("css selector", ".sample .finish")] == [
        "Finished: stopped"] * 4


def test_two_samples_stream_side_by_side(page):
    assert generate(page, "KING:", n=2, max_tokens=40, seed=3) == "done"
    columns = page.find_elements("css selector", ".sample")
    assert len(columns) == 2
    a, b = samples(page)
    assert a and b and a != b
    left, right = columns[0].rect, columns[1].rect
    assert abs(left["y"] - right["y"]) < 1 and right["x"] >= left["x"] + left["width"]


def test_the_default_length_leaves_room_for_the_prompt(srv, page):
    """Max new tokens untouched, a run asks for the default or what the prompt leaves of the
    context, whichever is less: the default alone (200, of a 256-token context) was refused
    for a prompt of 57 tokens or more. Typed, the value is sent as it is."""
    from selenium.webdriver.common.keys import Keys

    prompt = "ROMEO: " * 40
    count = post(f"{srv.url}/tokenize", {"prompt": prompt}, AUTH).json()["count"]
    context = httpx.get(f"{srv.url}/openai/v1/models", headers=AUTH).json()["data"][0][
        "max_model_len"]
    assert count + int(el(page, "max_tokens").get_attribute("value")) > context  # (refused)
    type_into(page, "prompt", prompt)
    el(page, "ignore_eos").click()
    el(page, "generate").click()
    wait(page, lambda d: state(d) != "streaming")
    assert state(page) == "done", el(page, "error").text
    assert el(page, "ntokens").text == str(context - count)
    el(page, "curl").click()  # the same request: the same room asked for
    wait(page, lambda d: d.find_element("id", "curl-text").is_displayed())
    v1 = el(page, "curl-text").get_attribute("textContent").split("\n\n")[0]
    assert f'"max_new_tokens":{context - count}' in v1
    out = subprocess.run(["bash", "-c", v1], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPT2SERVE_API_KEY": KEY}).stdout
    assert json.loads(out)["predictions"][0].startswith(prompt), out
    assert generate(page, prompt, max_tokens=200) == "error"
    assert f"plus the prompt's {count} tokens" in el(page, "error").text
    # emptied again, the field is untyped: the room again (it was the bare default, refused)
    el(page, "max_tokens").send_keys(Keys.CONTROL, "a")
    el(page, "max_tokens").send_keys(Keys.DELETE)
    assert el(page, "max_tokens").get_attribute("value") == ""
    el(page, "generate").click()
    wait(page, lambda d: state(d) != "streaming")
    assert state(page) == "done", el(page, "error").text
    assert el(page, "ntokens").text == str(context - count)


def test_a_refusal_keeps_the_samples_shown_and_says_why(page):
    """A run the server refuses (or cannot be sent) cleared the samples shown before it, and
    showed empty ones under the error."""
    assert generate(page, "KING:", n=2, max_tokens=20, seed=5) == "done"
    shown = samples(page)
    assert generate(page, "KING:", temperature=-1) == "error"
    assert samples(page) == shown and el(page, "error").is_displayed()
    page.execute_script('window.fetch = async () => { throw new TypeError("Failed to fetch"); };')
    assert generate(page, "KING:", temperature=1) == "error"
    assert samples(page) == shown
    assert el(page, "error").text.startswith("Cannot reach the server at http://127.0.0.1:")


def test_ctrl_enter_generates_from_any_field(page):
    from selenium.webdriver.common.keys import Keys

    type_into(page, "prompt", "ROMEO:")
    set_params(page, max_tokens=5)
    el(page, "temperature").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(page, lambda d: state(d) != "idle" and state(d) != "streaming")
    assert state(page) == "done" and samples(page)


def test_server_error_is_shown(srv, page):
    assert generate(page, "ROMEO:", temperature=-1) == "error"
    expected = post(f"{srv.url}/openai/v1/completions",
                    {"prompt": "ROMEO:", "temperature": -1}, AUTH).json()["error"]["message"]
    assert "temperature" in expected
    shown = el(page, "error")
    assert shown.is_displayed() and f"Server answered 400: {expected}" == shown.text


def test_a_seed_the_page_cannot_send_as_a_number_gets_the_servers_message(srv, page):
    """A seed with a leading zero went in as the JSON number 007, which is not JSON: the server
    could only say the body was malformed. As a string, the server names the field."""
    assert generate(page, "ROMEO:", seed="007") == "error"
    expected = post(f"{srv.url}/openai/v1/completions",
                    {"prompt": "ROMEO:", "seed": "007"}, AUTH).json()["error"]["message"]
    assert "seed" in expected
    assert el(page, "error").text == f"Server answered 400: {expected}"


@pytest.mark.parametrize("tail, message", [
    ('data: {"error": {"message": "engine failed", "type": "server_error"}}\n\n',
     "engine failed"),
    ("", "the stream ended before it finished ([DONE] missing)"),
    (None, "The connection to the server broke mid-stream (network error)"),
], ids=["error event", "cut short", "connection lost"])
def test_a_stream_that_fails_shows_why(page, tail, message):
    """The server answers 200 and then fails mid-stream: the page keeps what came and says why.
    (The page's fetch is replaced here, since the server gives no way to fail on purpose.)"""
    chunk = {"choices": [{"text": " Good morrow", "index": 0, "finish_reason": None}]}
    page.execute_script("""
        const [body, lost] = arguments;
        let pulls = 0;
        const real = window.fetch;
        window.fetch = async (url, options) => !String(url).endsWith("/completions")
            ? real(url, options) : new Response(new ReadableStream({pull(c) {
            if (pulls++ === 0) c.enqueue(new TextEncoder().encode(body));
            else if (lost) return new Promise((done) => setTimeout(() => {  // once read
                c.error(new TypeError("network error")); done(); }, 200));
            else c.close(); }}),
            {status: 200, headers: {"Content-Type": "text/event-stream"}});""",
                        f"data: {json.dumps(chunk)}\n\n{tail or ''}", tail is None)
    type_into(page, "prompt", "ROMEO:")
    el(page, "generate").click()
    wait(page, lambda d: state(d) == "error")
    assert el(page, "error").text == message
    assert samples(page) == [" Good morrow"]


@pytest.mark.parametrize("field, typed, label", [
    ("temperature", "1e", "Temperature"),
    ("max_tokens", "1e400", "Max new tokens"),
], ids=["not a number", "past a double"])
def test_a_number_the_page_cannot_read_is_refused_not_replaced(page, field, typed, label):
    """A number field reads what is not a number as empty, and the page sent the field's
    default in its place; 1e400 went as null, which the server reads as its own default. The
    run used settings its user never chose, and said nothing."""
    assert generate(page, "ROMEO:", **{field: typed}) == "error"
    assert el(page, "error").text == f"{label}: not a number"
    assert page.find_elements("css selector", ".sample") == []  # nothing was sent
    el(page, "curl").click()  # nor shown as a request
    assert el(page, "error").text == f"{label}: not a number"
    assert not el(page, "curl-text").is_displayed()
    type_into(page, field, "1")
    el(page, "curl").click()  # corrected: the request, and curl's own error gone
    wait(page, lambda d: d.find_element("id", "curl-text").is_displayed())
    assert not el(page, "error").is_displayed()


def test_a_paste_past_the_prompts_limit_gets_the_servers_message_not_a_cut(srv, page):
    """The prompt's maxLength cut a longer paste to the limit, without a word: the page then
    generated from a prompt its user never wrote."""
    limit = json.loads(re.search(r'application/json">(.*?)</script>',
                                 httpx.get(f"{srv.url}/playground").text).group(1))[
        "max_prompt_chars"]
    text = "ROMEO: " * (limit // 7 + 1)
    el(page, "prompt").clear()
    el(page, "prompt").click()
    page.execute_cdp_cmd("Input.insertText", {"text": text})  # as a paste arrives
    assert page.execute_script("return document.getElementById('prompt').value") == text
    el(page, "generate").click()
    wait(page, lambda d: state(d) != "streaming")
    expected = post(f"{srv.url}/openai/v1/completions", {"prompt": text}, AUTH).json()
    assert f"at most {limit}" in expected["error"]["message"]
    assert el(page, "error").text == f"Server answered 400: {expected['error']['message']}"


def test_the_keyboards_focus_stays_on_the_buttons(page):
    """Generate pressed from the keyboard is disabled while the run streams, and so is Stop
    once pressed: the focus fell to the page's start, and a keyboard or screen-reader user lost
    their place at every run. It goes from one button to the other."""
    from selenium.webdriver.common.keys import Keys

    active = lambda: page.switch_to.active_element.get_attribute("id")  # noqa: E731
    type_into(page, "prompt", "JULIET:")
    set_params(page, max_tokens=250, n=4)
    el(page, "ignore_eos").click()  # so all 4 run 250 tokens unless stopped
    el(page, "generate").send_keys(Keys.ENTER)
    assert state(page) == "streaming" and active() == "stop"
    page.switch_to.active_element.send_keys(Keys.ENTER)
    wait(page, lambda d: state(d) == "stopped", 10)
    assert active() == "generate"
    set_params(page, max_tokens=3, n=1)
    el(page, "generate").send_keys(Keys.ENTER)  # a run that ends by itself
    wait(page, lambda d: state(d) != "streaming")
    assert state(page) == "done" and active() == "generate"


REPLAY = """
    const [chunks, hold] = arguments;
    let next = 0;
    const real = window.fetch;
    window.fetch = async (url, options) => !String(url).endsWith("/completions")
        ? real(url, options) : new Response(new ReadableStream({pull(c) {
        if (next < chunks.length) c.enqueue(new TextEncoder().encode(chunks[next++]));
        else if (hold) return new Promise(() => {});  // the connection kept open
        else c.close(); }}),
        {status: 200, headers: {"Content-Type": "text/event-stream"}});"""
GOOD = '{"text": " Good", "index": 0}'


@pytest.mark.parametrize("chunks, hold, ended, message", [
    (['data: {"choices":\r', f'\ndata: [{GOOD}]}}\r\n\r\n', "data: [DONE]\r\n\r\n"],
     False, "done", ""),
    ([f'data: {{"choices": [null, {GOOD}, {{"text": "x", "index": "length"}}]}}\n\n',
      "data: [DONE]\n\n"], False, "done", ""),
    ([f'data: {{"choices": [{GOOD}]}}\n\n', "data: [DONE]\n\n"], True, "done", ""),
    ([f'data: {{"choices": [{GOOD}]}}\n\n', "data: 5\n\n"], False, "error",
     "the server sent an event that is not a JSON object: 5"),
], ids=["a CRLF split across reads", "odd choices", "held open after DONE", "not an object"])
def test_events_are_read_as_the_sse_spec_says(page, chunks, hold, ended, message):
    """Events as a proxy or a broken server may send them (the page's fetch replaced, since
    this server sends none of them). A \\r\\n split across two reads was two line ends, and cut
    an event in two; a choice that was not one raised a TypeError, shown as a broken stream;
    the page waited for the connection's end after [DONE]."""
    page.execute_script(REPLAY, chunks, hold)
    assert generate(page, "ROMEO:") == ended
    assert el(page, "error").text == message
    assert samples(page) == [" Good"]


def test_missing_key_shows_the_servers_message_and_key_is_kept(srv, page):
    page.refresh()
    assert el(page, "api_key").get_attribute("value") == KEY  # from the tab's storage
    type_into(page, "api_key", "\t")
    el(page, "generate").click()
    wait(page, lambda d: state(d) == "error")
    assert el(page, "error").text == f"Server answered 401: {MISSING_KEY}"
    wait(page, lambda d: "missing or wrong API key" in d.find_element("id", "model").text, 10)


def test_a_key_a_header_cannot_carry_is_named_not_blamed_on_the_connection(page):
    """fetch refuses a header past Latin-1: its TypeError was shown as 'Cannot reach the
    server'."""
    type_into(page, "api_key", "sek\u2019rit")
    assert generate(page, "ROMEO:", max_tokens=3) == "error"
    assert el(page, "error").text == "API key: \u2019 cannot be sent from this page"
    type_into(page, "api_key", KEY)


def test_the_key_s_error_goes_once_a_key_that_works_is_typed(srv, page):
    """A run without the key shows the server's 401; the right key typed then lists the
    models, and the 401 stayed on the page, as if the key did not work."""
    type_into(page, "api_key", "\t")
    assert generate(page, "ROMEO:", max_tokens=3) == "error"
    assert "Server answered 401" in el(page, "error").text
    type_into(page, "api_key", KEY + "\t")
    wait(page, lambda d: not el(d, "error").is_displayed(), 10)
    assert generate(page, "ROMEO:", temperature=-1) == "error"  # another error stays
    page.execute_script(DELAY_MODELS, [0])
    page.execute_script(SET_KEY, KEY)
    wait(page, lambda d: d.execute_script("return window.modelsHandled") == 1, 10)
    assert el(page, "error").is_displayed() and "temperature" in el(page, "error").text


def test_a_key_an_older_page_left_in_the_browsers_storage_is_dropped(page):
    """The key is the tab's (sessionStorage) only; an older page kept it in localStorage for
    good, where the first load of this one removes it."""
    page.execute_script("sessionStorage.clear(); "
                        f"localStorage.setItem('gpt2serve.apiKey', '{KEY}')")
    page.refresh()
    wait(page, lambda d: d.execute_script("return localStorage.getItem('gpt2serve.apiKey')")
         is None, 10)
    assert el(page, "api_key").get_attribute("value") == ""


def test_copy_as_curl_gives_requests_that_repeat_the_page(srv, page):
    ended = generate(page, "It's ROMEO:",  # a quote, for the shell quoting
                     max_tokens=30, seed=9223372036854775000, top_k=40, stop_strings="zz\\n")
    assert ended == "done", el(page, "error").text
    shown = samples(page)[0]
    el(page, "curl").click()
    wait(page, lambda d: d.find_element("id", "curl-text").is_displayed())
    text = el(page, "curl-text").get_attribute("textContent")
    v1, openai = text.split("\n\n")
    assert ":predict" in v1 and "/openai/v1/completions" in openai
    assert '"seed":9223372036854775000' in v1 and '"stop":["zz\\n"]' in v1
    env = {**os.environ, "GPT2SERVE_API_KEY": KEY}
    out = subprocess.run(["bash", "-c", v1], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    assert json.loads(out)["predictions"][0] == "It's ROMEO:" + shown
    out = subprocess.run(["bash", "-c", openai], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    events = [json.loads(line[6:]) for line in out.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["text"] for e in events for c in e["choices"]) == shown


def test_phone_width_is_usable(page):
    page.set_window_size(*PHONE)
    width = page.execute_script("return window.innerWidth")
    assert page.execute_script("return document.documentElement.scrollWidth") <= width
    for id_ in ("prompt", "generate", "stop", "curl", "max_tokens", "temperature", "n", "seed",
                "stop_strings", "api_key"):
        r = el(page, id_).rect
        assert 0 <= r["x"] and r["x"] + r["width"] <= width, id_
    assert generate(page, "ROMEO:", max_tokens=20, n=2) == "done"
    a, b = page.find_elements("css selector", ".sample")
    assert b.rect["y"] >= a.rect["y"] + a.rect["height"]  # stacked, not squeezed
    # The samples come right under the buttons, before the settings, with Stop in reach.
    assert el(page, "generate").rect["y"] < a.rect["y"] < el(page, "max_tokens").rect["y"]
    assert page.execute_script("return document.documentElement.scrollWidth") <= width
    screenshot(page, "playground-phone")


@pytest.fixture(scope="module")
def axe_js() -> str:
    if not AXE_JS.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("no npm to install axe-core for the accessibility lint")
        subprocess.run([npm, "install", "--prefix", str(AXE_DIR), "--no-save", "--no-audit",
                        "--no-fund", "--silent", f"axe-core@{AXE_VERSION}"],
                       check=True, timeout=300)
    return AXE_JS.read_text()


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_accessibility_lint(page, axe_js, size):
    """axe-core's WCAG 2.1 A/AA rules and best practices (labels, contrast, landmarks...) over
    the page with samples, an error and the curl box showing."""
    page.set_window_size(*size)
    generate(page, "ROMEO:", n=2, max_tokens=20)
    el(page, "curl").click()
    page.execute_script("document.getElementById('error').textContent = 'an error';"
                        "document.getElementById('error').hidden = false;")
    page.execute_script(axe_js)
    result = page.execute_async_script(
        "const done = arguments[0];"
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a',"
        " 'wcag21aa', 'best-practice']}}).then(r => done({violations: r.violations.map("
        "v => ({id: v.id, nodes: v.nodes.map(n => n.target.join(' '))})),"
        " passes: r.passes.map(p => p.id)}), e => done({error: String(e)}));")
    assert "error" not in result, result
    assert result["violations"] == []
    for rule in ("label", "color-contrast", "button-name", "html-has-lang", "landmark-one-main"):
        assert rule in result["passes"]  # these rules ran and found nothing wrong


def test_screenshot_of_a_generation(page):
    assert generate(page, "ROMEO:", n=2, max_tokens=120, seed=1) == "done"
    path = screenshot(page, "playground")
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == page.execute_script("return window.innerWidth")


# ---- a repository of models ----

REPO_MODELS = ("alpha", "beta")
# /openai/v1/models answers after the delay given for its call, in order, so that the page's
# calls answer in the order a test needs, whatever the machine's speed. window.modelsHandled
# counts the answers the page has read and acted on: its reads and what follows them are
# promise callbacks, which all run before a timer's.
DELAY_MODELS = """
    window.modelsDelays = arguments[0];
    window.modelsHandled = 0;
    const fetchNow = window.fetch;
    window.fetch = async (url, options) => {
        if (!String(url).endsWith("/openai/v1/models")) return fetchNow(url, options);
        const delay = window.modelsDelays.shift() || 0;  // in the order of the calls
        const r = await fetchNow(url, options);
        await new Promise((done) => setTimeout(done, delay));
        for (const read of ["json", "text"]) {
            const own = r[read].bind(r);
            r[read] = async () => {
                const value = await own();
                setTimeout(() => { window.modelsHandled += 1; }, 0);
                return value;
            };
        }
        return r;
    };"""
SET_KEY = """
    const key = document.getElementById("api_key");
    key.value = arguments[0];
    key.dispatchEvent(new Event("change"));"""


@pytest.fixture(scope="module")
def repo_srv(tmp_path_factory):
    """A server of a folder of two models, each with its own random weights, and the key."""
    root = tmp_path_factory.mktemp("repo")
    for seed, name in enumerate(REPO_MODELS, 1):
        make_hf_model(root / name, seed=seed)
    srv = ServerProcess("--model_dir", str(root), "--enable_grpc", "false", "--api_key", KEY)
    try:
        for name in REPO_MODELS:
            srv.wait_ready(name, headers=AUTH)
        yield srv
    finally:
        srv.stop()


def greedy(srv, model: str, prompt: str, max_tokens: int) -> str:
    body = {"instances": [{"prompt": prompt, "max_new_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True}]}
    r = post(f"{srv.url}/v1/models/{model}:predict", body, AUTH)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0][len(prompt):]


def test_the_model_picker_routes_by_name(repo_srv, driver):
    """Generate pressed just after the key was typed, its list of models not yet answered: the
    run went without a model, and a server of several refused it ('model' is required). It
    waits for the list, then runs on the first model; the picker runs the other."""
    from selenium.webdriver.support.ui import Select

    open_page(driver, repo_srv)
    wait(driver, lambda d: "unknown" in el(d, "model").text)  # no key yet: 401
    driver.execute_script(DELAY_MODELS, [1000])
    type_into(driver, "prompt", "ROMEO:")
    set_params(driver, max_tokens=12, temperature=0)
    el(driver, "ignore_eos").click()
    driver.execute_script(SET_KEY + 'document.getElementById("generate").click();', KEY)
    wait(driver, lambda d: state(d) != "streaming")
    assert state(driver) == "done", el(driver, "error").text
    assert el(driver, "model").text.startswith("Model: alpha")
    texts = {"alpha": samples(driver)[0]}
    picker = Select(el(driver, "model-picker"))
    assert [o.text for o in picker.options] == list(REPO_MODELS)
    assert picker.first_selected_option.text == "alpha"
    picker.select_by_value("beta")
    el(driver, "generate").click()
    wait(driver, lambda d: state(d) != "streaming")
    assert state(driver) == "done", el(driver, "error").text
    texts["beta"] = samples(driver)[0]
    assert texts == {m: greedy(repo_srv, m, "ROMEO:", 12) for m in REPO_MODELS}
    assert texts["alpha"] != texts["beta"]
    # while a run streams, its model stays picked (picked meanwhile, the run's text was shown
    # under the other's name)
    assert driver.execute_script('document.getElementById("generate").click(); '
                                 'return document.getElementById("model-picker").disabled')
    wait(driver, lambda d: state(d) != "streaming")
    assert state(driver) == "done" and el(driver, "model-picker").is_enabled()


def test_a_list_of_models_answered_late_does_not_overwrite_a_later_one(repo_srv, driver):
    """A wrong key, then the right one: the first call's 401, answered last, replaced the
    models the second had listed, and the page said the model was unknown."""
    open_page(driver, repo_srv)
    wait(driver, lambda d: "unknown" in el(d, "model").text)
    driver.execute_script(DELAY_MODELS, [1000, 0])
    driver.execute_script(SET_KEY, "a-wrong-key")
    driver.execute_script(SET_KEY, KEY)
    wait(driver, lambda d: d.execute_script("return window.modelsHandled") == 2)
    assert el(driver, "model").text.startswith("Model: alpha"), el(driver, "model").text
    assert el(driver, "model-picker").is_enabled()


def test_stop_while_generate_waits_for_the_models_list(repo_srv, driver):
    """Generate waits for the models list a key just typed asks for: Stop did nothing until
    that list came, and from a server that never answered, nothing ever did."""
    open_page(driver, repo_srv)
    wait(driver, lambda d: "unknown" in el(d, "model").text)
    driver.execute_script(DELAY_MODELS, [600_000])
    driver.execute_script(SET_KEY + 'document.getElementById("generate").click();', KEY)
    assert state(driver) == "streaming"
    el(driver, "stop").click()
    wait(driver, lambda d: state(d) == "stopped", 10)
    assert not el(driver, "error").is_displayed() and samples(driver) == []
    assert el(driver, "generate").is_enabled() and not el(driver, "stop").is_enabled()
