"""The HTTP API on 127.0.0.1, over the tiny model: stories, the seeds' shapes, errors, keys, metrics."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from storygen.config import Secret
from tests.conftest import tiny_config, until
from tests.model_hooks import ModelGate, endless, gate  # noqa: F401  (fixtures)
from tests.web_helpers import read_sse, web_front_end


@pytest.fixture
def lm(tiny_lms):
    return tiny_lms["instruct"]


@pytest.fixture
async def web(lm, tmp_path):
    async with web_front_end(lm, tmp_path) as front:
        yield front


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def _post(http, web, path, body, **kw):
    async with http.post(web.url + path, json=body, **kw) as response:
        return response.status, await response.json(), response.headers


async def test_a_story_as_json(http, web):
    status, story, _ = await _post(http, web, "/v1/stories", {"genre": "horror", "prompt": "The door opened",
                                                              "length": 12, "seed": 3})
    assert status == 200, story
    assert story["text"].startswith("The door opened") and story["genre"] == "horror"
    assert story["finish_reason"] in ("stop", "length") and story["seed"] == 3
    assert 0 < story["tokens"] <= 12 and story["prompt_tokens"] > 0 and story["timings"]["total_s"] > 0
    again = await _post(http, web, "/v1/stories", {"genre": "horror", "prompt": "The door opened",
                                                   "length": 12, "seed": 3})
    assert again[1]["text"] == story["text"]  # same seed, same story


async def test_a_streamed_story_shows_its_text_as_it_is_written(http, web, endless):  # noqa: F811
    async with http.post(web.url + "/v1/stories", json={"genre": "drama", "prompt": "Rain", "length": 10,
                                                         "stream": True}) as response:
        assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1] == "[DONE]"
    kinds = [e["type"] for e in events[:-1]]
    assert kinds[0] == "start" and kinds[-1] == "story" and "chunk" in kinds
    story = events[-2]["story"]
    streamed = "".join(e["text"] for e in events if isinstance(e, dict) and e["type"] == "chunk")
    assert story["text"].startswith("Rain") and story["tokens"] == 10
    assert ("Rain" + streamed).startswith(story["text"].rstrip()[: len("Rain") + 1])


async def test_the_seeds_input_shape_gets_a_story_that_starts_with_the_opening(http, web):
    status, body, _ = await _post(http, web, "/", {"input": "<BOS> <sci_fi> After discovering time travel"})
    assert status == 200 and body["output"].startswith("After discovering time travel")
    status, body, _ = await _post(http, web, "/", {"input": "A bare prompt takes the default genre"})
    assert status == 200 and body["output"].startswith("A bare prompt takes the default genre")


async def test_the_generate_shape(http, web):
    status, body, _ = await _post(http, web, "/generate", {"prompt": "Once", "genre": "action", "length": 8})
    assert status == 200 and body["genre"] == "action" and body["tokens"] <= 8 and body["text"].startswith("Once")


@pytest.mark.parametrize("body, status, fragment", [
    (b'{"prompt": "x", ', 400, "the body is not valid JSON"),
    (b'[1, 2]', 400, "the body must be a JSON object"),
    ({"prompt": "x", "length": "long"}, 400, 'length="long": input should be a valid integer'),
    ({"prompt": "x", "length": 10**9}, 400, "length=1000000000 is out of range; allowed: 1 to 400 tokens"),
    ({"prompt": "x", "temperature": 99}, 400, "temperature=99.0 is out of range; allowed: 0 to 2"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p=0: input should be greater than 0"),
    ({"prompt": "x", "temprature": 1}, 400, "unknown field 'temprature'"),
    ({"genre": "drama"}, 400, "prompt is required"),
    ({"prompt": "x", "genre": "western"}, 400, "unknown genre 'western'; choose one of: action, auto"),
    ({"prompt": "x", "stream": "yes"}, 400, 'stream="yes": input should be a valid boolean'),
    ({"prompt": "   "}, 400, "the story opening is empty"),
    ({"prompt": "x" * 5000}, 400, "prompt="),
])
async def test_bad_requests_get_a_one_line_4xx_naming_what_is_wrong(http, web, body, status, fragment):
    kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    async with http.post(web.url + "/v1/stories", **kw) as response:
        answer = await response.json()
    assert response.status == status, answer
    error = answer["error"]
    assert fragment in error["message"] and "\n" not in error["message"] and error["type"]
    async with http.get(web.url + "/healthz") as health:  # and the server goes on serving
        assert health.status == 200


async def test_an_oversized_body_is_refused_before_it_is_parsed(http, web):
    big = json.dumps({"prompt": "x" * (10 * 1024 * 1024)})
    async with http.post(web.url + "/v1/stories", data=big, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413 and "over 64 KiB" in (await r.json())["error"]["message"]

    async def chunked():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b"x" * 4096

    async with http.post(web.url + "/v1/stories", data=chunked(), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    async with http.get(web.url + "/healthz") as health:
        assert health.status == 200


async def test_unknown_routes_and_methods_answer_in_the_same_shape(http, web):
    async with http.get(web.url + "/v1/nope") as r:
        assert r.status == 404 and "no route '/v1/nope'" in (await r.json())["error"]["message"]
    async with http.get(web.url + "/v1/stories") as r:
        assert r.status == 405 and "GET is not allowed" in (await r.json())["error"]["message"]


async def test_api_keys(lm, tmp_path, http):
    async with web_front_end(lm, tmp_path, http_api_keys=(Secret("right-key-123"),)) as web:
        body = {"prompt": "Once", "length": 4}
        for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "right-key-123"}):
            status, answer, response_headers = await _post(http, web, "/v1/stories", body, headers=headers)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key"
            assert response_headers["WWW-Authenticate"] == "Bearer"
        assert web.web.metrics.tokens_total == 0  # no story was written for them
        status, answer, _ = await _post(http, web, "/v1/stories", body,
                                        headers={"Authorization": "Bearer right-key-123"})
        assert status == 200
        stored = web.web.service.state.story(answer["id"])
        assert stored.user_key.startswith("api:key-") and "right-key" not in stored.user_key
        async with http.get(web.url + "/healthz") as health:  # health needs no key
            assert health.status == 200


async def test_each_client_gets_the_per_user_cap(lm, tmp_path, http, endless):  # noqa: F811
    config = tiny_config(lm.name, "instruct", tmp_path, max_per_user=1)
    async with web_front_end(lm, tmp_path, storygen=config) as web:
        first = asyncio.create_task(_post(http, web, "/v1/stories", {"prompt": "One", "length": 200}))
        await until(lambda: web.web.service.worker.health()["running"] + web.web.service.worker.queue_depth() == 1)
        status, answer, headers = await _post(http, web, "/v1/stories", {"prompt": "Two", "length": 4})
        assert status == 429 and "you already have 1 story in progress" in answer["error"]["message"]
        assert int(headers["Retry-After"]) >= 1
        first.cancel()


async def test_a_client_that_goes_away_mid_stream_cancels_its_story(lm, tmp_path, http, endless):  # noqa: F811
    async with web_front_end(lm, tmp_path) as web:
        worker = web.web.service.worker
        response = await http.post(web.url + "/v1/stories", json={"prompt": "Long", "length": 400, "stream": True})
        async for line in response.content:
            if b'"chunk"' in line:
                break
        response.close()  # the client hangs up
        await until(lambda: worker.metrics.snapshot()["requests"].get("cancelled") == 1)
        assert worker.health()["running"] == 0


async def test_a_client_that_goes_away_while_waiting_for_json_cancels_its_story(lm, tmp_path, endless):  # noqa: F811
    async with web_front_end(lm, tmp_path) as web:
        worker = web.web.service.worker
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(session.post(web.url + "/v1/stories", json={"prompt": "Long", "length": 400}))
            await until(lambda: worker.health()["running"] == 1)
            task.cancel()
        await until(lambda: worker.metrics.snapshot()["requests"].get("cancelled") == 1)


async def test_genres_health_and_docs(http, web):
    async with http.get(web.url + "/v1/genres") as r:
        genres = (await r.json())["genres"]
    assert {g["name"] for g in genres} >= {"superhero", "sci_fi", "horror", "action", "thriller", "drama"}
    async with http.get(web.url + "/healthz") as r:
        health = await r.json()
        assert r.status == 200 and health["status"] == "ok" and health["worker"]["state"] == "running"
    async with http.get(web.url + "/openapi.json") as r:
        paths = (await r.json())["paths"]
        assert {"/v1/stories", "/v1/completions", "/v1/models", "/", "/generate"} <= set(paths)
    async with http.get(web.url + "/docs") as r:
        assert r.status == 200 and "swagger" in (await r.text()).lower()


async def test_health_is_503_until_the_model_is_loaded_and_after_the_worker_stops(lm, tmp_path, http):
    from bot.config import BotConfig
    from bot.web.server import WebFrontEnd
    from dataclasses import replace

    web = WebFrontEnd(replace(BotConfig(), http_port=0))
    await web.start()
    try:
        async with http.get(web.url + "/healthz") as r:
            assert r.status == 503 and (await r.json())["status"] == "starting"
        status, answer, _ = await _post(http, web, "/v1/stories", {"prompt": "x"})
        assert status == 503 and "starting up" in answer["error"]["message"]
        async with http.get(web.url + "/") as r:  # the page is there at once
            assert r.status == 200
    finally:
        await web.stop()
    async with web_front_end(lm, tmp_path) as web:
        await web.web.service.worker.stop()
        async with http.get(web.url + "/healthz") as r:
            assert r.status == 503 and (await r.json())["worker"]["state"] == "stopped"


async def test_metrics_parse_as_prometheus_text_and_show_the_queue(http, web):
    await _post(http, web, "/v1/stories", {"prompt": "Once", "length": 4})
    async with http.get(web.url + "/metrics") as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    assert families["storygen_queue_depth"].samples[0].value == 0
    done = [s for s in families["storygen_stories"].samples
            if s.name == "storygen_stories_total" and s.labels == {"frontend": "api", "outcome": "done"}]
    assert done and done[0].value == 1
    assert "storygen_ttft_seconds" in families and "storygen_running_rows" in families


async def test_port_in_use_is_one_clear_line(web):
    from bot.config import BotConfig
    from bot.web.server import WebFrontEnd
    from dataclasses import replace
    from storygen.errors import ConfigError

    port = int(web.url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"HTTP_PORT={port}: cannot listen on 127.0.0.1:{port}"):
        await WebFrontEnd(replace(BotConfig(), http_port=port)).start()


# ---- OpenAI-compatible completions


async def test_the_official_openai_client_completes_and_streams(web):
    import openai

    client = openai.AsyncOpenAI(base_url=web.url + "/v1", api_key="unused", max_retries=0)
    models = await client.models.list()
    assert [m.id for m in models.data] == ["storybot"]
    done = await client.completions.create(model="storybot", prompt="The castle", max_tokens=8, seed=1,
                                           extra_body={"genre": "fantasy", "top_k": 20})
    choice = done.choices[0]
    assert choice.finish_reason in ("stop", "length") and done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens > 0 and not choice.text.startswith("The castle")
    stream = await client.completions.create(model="storybot", prompt="The castle", max_tokens=8, seed=1,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"genre": "fantasy", "top_k": 20})
    parts, reasons, usage = [], [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert "".join(parts).startswith(choice.text.rstrip()[:10])  # same seed: the same completion
    assert usage.completion_tokens == done.usage.completion_tokens
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4' does not exist"):
        await client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="logprobs are not supported"):
        await client.completions.create(model="storybot", prompt="x", logprobs=2)
    await client.close()


async def test_a_stop_string_ends_the_completion_where_it_first_appears(http, web, endless):  # noqa: F811
    body = {"model": "storybot", "prompt": "Once", "max_tokens": 60, "seed": 4, "genre": "drama"}
    status, full, _ = await _post(http, web, "/v1/completions", body)
    text = full["choices"][0]["text"]
    stop = text.strip()[3:6]
    assert status == 200 and len(stop) == 3
    status, cut, _ = await _post(http, web, "/v1/completions", {**body, "stop": [stop]})
    assert cut["choices"][0]["text"] == text[:text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    async with http.post(web.url + "/v1/completions", json={**body, "stop": stop, "stream": True}) as r:
        events = await read_sse(r)
    streamed = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))
    assert streamed == text[:text.index(stop)] and events[-2]["choices"][0]["finish_reason"] == "stop"


# ---- the playground's command route


async def _command(http, web, body):
    async with http.post(web.url + "/v1/commands", json=body) as response:
        if response.headers["content-type"].startswith("text/event-stream"):
            return response.status, await read_sse(response)
        return response.status, await response.json()


async def test_commands_answer_with_the_chat_wording(http, web):
    from bot import messages

    assert await _command(http, web, {"text": "/story help"}) == (200, {"reply": messages.HELP})
    status, answer = await _command(http, web, {"text": "/story settings temperature=1.1"})
    assert status == 200 and answer["reply"].startswith(messages.SETTINGS_SAVED) and "1.1" in answer["reply"]
    status, answer = await _command(http, web, {"text": "/story settings temperature=9"})
    assert (status, answer["error"]["message"]) == (400, "temperature=9.0 is out of range; allowed: 0 to 2 (0 means greedy)")
    status, answer = await _command(http, web, {"text": "/story queue"})
    assert answer["reply"].startswith("You have no story in progress.")
    status, answer = await _command(http, web, {"text": "/dance now"})
    assert status == 400 and "unknown command '/dance'" in answer["error"]["message"]


async def test_a_story_command_streams_and_its_buttons_work(http, web):
    status, events = await _command(http, web, {"text": "/story horror The cellar door length=8 seed=2"})
    start, story = events[0], events[-2]["story"]
    assert start["type"] == "start" and start["text"] == "The cellar door" and start["genre"] == "horror"
    assert story["text"].startswith("The cellar door")
    status, events = await _command(http, web, {"action": "continue", "request_id": start["id"]})
    assert events[0]["text"] == story["text"] and "story" in events[-2], events
    assert events[-2]["story"]["text"].startswith(story["text"])
    status, answer = await _command(http, web, {"action": "cancel", "request_id": start["id"]})
    assert answer == {"reply": "You have no story in progress."}
    status, answer = await _command(http, web, {"action": "regenerate"})
    assert status == 400 and "needs the story's request_id" in answer["error"]["message"]


# ---- python -m bot, as `make run` starts it


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_python_m_bot_with_no_chat_tokens_serves_http_and_drains_on_sigterm(tiny_dirs, tmp_path, http):
    import os
    import signal
    import sys
    from pathlib import Path

    port, db = _free_port(), tmp_path / "bot.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HTTP_PORT": str(port),
           "STORYGEN_MODEL": str(tiny_dirs["instruct"]), "STORYGEN_FORMAT": "instruct", "STORYGEN_DEVICE": "cpu",
           "STORYGEN_SETTINGS_DB": str(db), "BOT_SHUTDOWN_GRACE_S": "0", "STORYGEN_CACHE_DIR": str(tmp_path)}
    for key in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "HTTP_API_KEYS"):
        env.pop(key, None)
    bot = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", cwd=tmp_path, env=env,
                                               stderr=asyncio.subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("python -m bot did not become healthy")
        response = await http.post(url + "/v1/stories", json={"prompt": "Long", "length": 400, "stream": True})
        first = await response.content.readline()
        assert first.startswith(b"data: ")
        bot.send_signal(signal.SIGTERM)  # mid-story
        events = [json.loads(first[6:])] + await read_sse(response)
        assert events[-1] == "[DONE]"
        last = events[-2]
        assert last["type"] == "story" or "shutting down" in last["error"]["message"], last
        assert await asyncio.wait_for(bot.wait(), 30) == 0
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()
    log = (await bot.stderr.read()).decode()
    assert "Discord is off: DISCORD_TOKEN is not set" in log and "Slack is off: SLACK_BOT_TOKEN is not set" in log
    assert f"serving the API and the playground on {url}/" in log and "stopped" in log
    assert db.exists() and not Path(str(db) + "-wal").exists()  # closed: the WAL was checkpointed into the file


async def test_streams_and_waiting_requests_still_open_at_shutdown_are_told_so_at_once(lm, tmp_path, http,
                                                                                       gate):  # noqa: F811
    async with web_front_end(lm, tmp_path) as web:
        gate.open.clear()  # the model is stuck: the stories cannot even leave the batch
        stream = await http.post(web.url + "/v1/stories", json={"prompt": "A", "length": 50, "stream": True})
        waiting = asyncio.create_task(_post(http, web, "/v1/stories", {"prompt": "B", "length": 50}))
        await until(lambda: len(web.web.live.handles) == 2)
        assert web.web.live.stop_all() == 2
        events = await asyncio.wait_for(read_sse(stream), 5)
        status, answer, _ = await asyncio.wait_for(waiting, 5)
        gate.open.set()
    assert events[-1] == "[DONE]" and "shutting down" in events[-2]["error"]["message"]
    assert status == 503 and "shutting down" in answer["error"]["message"]
