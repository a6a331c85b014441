"""The OpenAI-compatible server (openmoe/serve.py) with the tiny model, answered by the real `openai` client.

Expected texts come from the model directly (model.generate on one prompt, dropless, decoded as infer.py does), not
from the server's own code path."""

import concurrent.futures
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
import torch

from openmoe import OpenMoeForCausalLM, preset, serve
from openmoe.data import decode, load_tokenizer
from openmoe.generation import generate
from openmoe.inference import CHAT_SYSTEM, chat_prompt, encode_batch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "assets", "tokenizer")
PROMPTS = ["Reverse the word: apple.", "Hi", "Write the word in capital letters.\n\nInput: ocean\n\nOutput:",
           "one two three four five six", "Translate to French: cat", "a", "The sky is", "List three colours:"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("serve") / "tiny"
    OpenMoeForCausalLM(preset("tiny", initializer_range=0.2)).save_pretrained(str(d))
    for f in os.listdir(TOKENIZER):
        shutil.copy(os.path.join(TOKENIZER, f), d)
    return str(d)


@pytest.fixture(scope="module")
def direct(ckpt):
    """Greedy completion of one prompt, alone, straight from the model."""
    tok = load_tokenizer(ckpt)
    model = OpenMoeForCausalLM.from_pretrained(ckpt).eval()
    model.apply_options(model.options.replace(dropless=True))

    def complete(prompt, max_tokens, stop=()):
        ids, mask = encode_batch(tok, [prompt])
        new = generate(model, ids, mask, max_new_tokens=max_tokens, vocab_limit=len(tok))[0, ids.shape[1]:].tolist()
        new = new[: new.index(1)] if 1 in new else new  # </s>
        text = decode(tok, new).lstrip()
        cuts = [text.find(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text
    return complete


@pytest.fixture(scope="module")
def server(ckpt):
    model, tok, _ = serve.load(serve.build_parser().parse_args(["--model", ckpt]))
    srv = serve.start(model, tok, port=0, model_name="tiny", max_batch_size=8, batch_window_s=0.2)
    yield srv
    serve.stop(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(f"{server.url}/health") as r:
        assert r.status == 200 and json.load(r) == {"status": "ok"}


def test_completion_and_chat_equal_direct_generate(client, direct):
    res = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    want = direct(PROMPTS[0], 12)
    assert res.choices[0].text == want and want
    assert res.usage.prompt_tokens == len(load_tokenizer(TOKENIZER).encode(PROMPTS[0], add_special_tokens=False)) + 1
    assert res.choices[0].finish_reason == ("length" if res.usage.completion_tokens == 12 else "stop")

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a colour."}],
                                          max_tokens=10, temperature=0)
    want = direct(chat_prompt([("user", "Name a colour.")], CHAT_SYSTEM), 10, stop=("</s>",))
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"


def test_streaming_chunks_concatenate_to_the_plain_answer(client):
    for stop in (None, "ir"):  # greedy text: 'teacher\ufffd catir num? ...': the stop cuts after ' cat'
        kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=stop)
        plain = client.completions.create(**kw).choices[0]
        chunks = list(client.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == plain.text and len(chunks) > 2
        assert chunks[-1].choices[0].finish_reason == plain.finish_reason
        if stop:
            assert plain.finish_reason == "stop" and plain.text.endswith(" cat")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_seeded_sampling_is_reproducible_and_equals_direct_sampling(client, ckpt):
    kw = dict(model="tiny", prompt=PROMPTS[4], max_tokens=12, temperature=0.7, top_p=0.9, extra_body={"top_k": 40})
    a, b = (client.completions.create(seed=5, **kw).choices[0].text for _ in range(2))
    c = client.completions.create(seed=6, **kw).choices[0].text
    assert a == b and a != c
    tok = load_tokenizer(ckpt)  # the same draw straight from generation.generate with a generator seeded 5
    model = OpenMoeForCausalLM.from_pretrained(ckpt).eval()
    model.apply_options(model.options.replace(dropless=True))
    ids, mask = encode_batch(tok, [PROMPTS[4]])
    new = generate(model, ids, mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9, top_k=40,
                   generator=torch.Generator().manual_seed(5), vocab_limit=len(tok))[0, ids.shape[1]:].tolist()
    assert a == decode(tok, new[: new.index(1)] if 1 in new else new).lstrip()


def test_eight_concurrent_requests_are_batched_and_each_equals_its_single_result(client, server, direct):
    before = len(server.engine.batches)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.completions.create, model="tiny", prompt=p, max_tokens=10 + i, temperature=0)
                   for i, p in enumerate(PROMPTS)]
        texts = [f.result().choices[0].text for f in futures]
    assert texts == [direct(p, 10 + i) for i, p in enumerate(PROMPTS)]
    sizes = server.engine.batches[before:]
    assert sum(sizes) == 8 and max(sizes) > 1, sizes  # one left-padded generate call served several requests


def test_fast_decoder_server_equals_single_results(ckpt, direct):
    """--decode static: the static-cache decoder behind the same adapter; batched and streamed answers unchanged."""
    model, tok, _ = serve.load(serve.build_parser().parse_args(["--model", ckpt]))
    srv = serve.start(model, tok, port=0, model_name="tiny", batch_window_s=0.2, decode="static")
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(c.completions.create, model="tiny", prompt=p, max_tokens=10 + i, temperature=0)
                       for i, p in enumerate(PROMPTS)]
            texts = [f.result().choices[0].text for f in futures]
        assert texts == [direct(p, 10 + i) for i, p in enumerate(PROMPTS)]
        assert max(srv.engine.batches) > 1
        chunks = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0, stream=True)
        assert "".join(ch.choices[0].text for ch in chunks) == direct(PROMPTS[2], 16)
    finally:
        serve.stop(srv)


def test_continuous_batching_short_request_overtakes_long_one(ckpt, direct, client):
    """--decode continuous: a short request sent while a long one streams joins the running batch and finishes first;
    every answer (also of 8 concurrent requests, and seeded sampling, run alone) equals the single-prompt result."""
    import threading
    import time

    model, tok, _ = serve.load(serve.build_parser().parse_args(["--model", ckpt]))
    srv = serve.start(model, tok, port=0, model_name="tiny", max_batch_size=4, decode="continuous")
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
    try:
        started, finished, long_text = threading.Event(), {}, []

        def long_request():
            for chunk in c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=300, temperature=0,
                                              stream=True):
                long_text.append(chunk.choices[0].text)
                started.set()
            finished["long"] = time.monotonic()

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(30)
        short = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0).choices[0].text
        finished["short"] = time.monotonic()
        worker.join(60)
        assert finished["short"] < finished["long"] and srv.engine.admissions[:2] == [0, 1]
        assert short == direct(PROMPTS[1], 4) and "".join(long_text) == direct(PROMPTS[0], 300)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 requests through 4 slots
            futures = [pool.submit(c.completions.create, model="tiny", prompt=p, max_tokens=10 + i, temperature=0)
                       for i, p in enumerate(PROMPTS)]
            assert [f.result().choices[0].text for f in futures] == [direct(p, 10 + i) for i, p in enumerate(PROMPTS)]
        assert max(srv.engine.admissions[2:]) >= 1  # admitted beside busy slots
        kw = dict(model="tiny", prompt=PROMPTS[4], max_tokens=12, temperature=0.7, top_p=0.9, seed=5)
        assert c.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text
    finally:
        serve.stop(srv)


def test_bad_requests_get_400_naming_the_field_and_serving_continues(client, server, direct):
    cases = [
        (dict(prompt="x", max_tokens=-3), "'max_tokens' must be an integer >= 1, got -3"),
        (dict(prompt="x", temperature=5), "'temperature' must be a number in [0.0, 2.0], got 5"),
        (dict(prompt=7), "'prompt' must be a string or a non-empty list of strings, got 7"),
        (dict(prompt="x", n=2), "'n' = 2 is not supported (only n = 1 is served)"),
        (dict(prompt="x", max_tokens=600), "'max_tokens' (600) + the prompt (3 tokens) = 603 exceeds the model's "
                                           "context (512 tokens)"),
        (dict(prompt="x", extra_body={"max_token": 3}), "unrecognized request field(s) ['max_token']"),
    ]
    for kw, message in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", **kw)
        assert e.value.status_code == 400 and message in e.value.body["message"], (kw, e.value.body)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' is not served here; served: 'tiny'"):
        client.completions.create(model="gpt-4", prompt="x")
    req = urllib.request.Request(f"{server.url}/v1/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and "not valid JSON" in json.load(e.value)["error"]["message"]
    res = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    assert res.choices[0].text == direct(PROMPTS[1], 6)


def test_full_queue_gets_429_and_stopped_engine_503(ckpt):
    model, tok, _ = serve.load(serve.build_parser().parse_args(["--model", ckpt]))
    srv = serve.start(model, tok, port=0, model_name="tiny", max_queue=2)
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.RateLimitError, match=r"the server is busy: 0 sequences are waiting and this request "
                                                    r"adds 3 \(queue limit 2\)"):
        c.completions.create(model="tiny", prompt=["a", "b", "c"], max_tokens=2)
    assert len(c.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2, temperature=0).choices) == 2
    srv.engine.stop()
    with pytest.raises(openai.InternalServerError, match="the generation engine is not running") as e:
        c.completions.create(model="tiny", prompt="a", max_tokens=2)
    assert e.value.status_code == 503
    serve.stop(srv)


def test_collective_engine_with_one_rank(ckpt, direct):
    """The expert-parallel loop (batch and per-step stop flag broadcast from rank 0) on a 1-process gloo group."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model, tok, _ = serve.load(serve.build_parser().parse_args(["--model", ckpt]))
        srv = serve.start(model, tok, port=0, model_name="tiny", distributed=True)
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        res = c.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=8, temperature=0, stop=["zzz"])
        assert res.choices[0].text == direct(PROMPTS[3], 8)
        serve.stop(srv)
    finally:
        dist.destroy_process_group()


def test_cli_serves_and_refuses_bad_options(ckpt, capsys):
    assert serve.main(["--model", ckpt, "--max_batch_size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max_batch_size (0) must be >= 1"
    assert serve.main(["--model", ckpt, "--capacity_routing", "--decode", "static"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --decode static routes dropless (no data-dependent shapes); "
                                               "--capacity_routing needs --decode eager")
    assert serve.main(["--model", ckpt, "--ep_size", "2", "--decode", "continuous"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --decode continuous runs on one device; with --ep_size 2 use "
                                               "--decode eager")
    proc = subprocess.Popen([sys.executable, "-m", "openmoe.serve", "--model", ckpt, "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving tiny on http://127.0.0.1:"), (line, proc.stderr.read() if not line else "")
        url = line.split(" on ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert c.completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0).choices[0].text != ""
    finally:
        proc.terminate()
        proc.wait(timeout=30)
