"""Stock OpenAI SDK clients through Spillway: chat, stream, embeddings, failover on 429.

Usage: sdk_check.py PATH_TO_SPILLWAY. Starts `spillway sim` (the example fleet) and
`spillway serve` in front of it, on free loopback ports, and stops both at the end.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import openai

KEY = "sdk-check-key"
API_VERSION = "2024-10-21"
MAX_BODY_BYTES = 1024 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sim(binary):
    sim = subprocess.Popen([binary, "sim"], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in sim.stdout:
        if line.strip() == "# sim ready":
            break
        lines.append(line)
    else:
        raise SystemExit("spillway sim exited before it was ready")
    urls = {}
    current = None
    for line in lines:
        if line.startswith("id = "):
            current = line.split('"')[1]
        if line.startswith("url = ") and current:
            urls[current] = line.split('"')[1]
    backends = "".join(l for l in lines if not l.startswith("#"))
    return sim, backends, urls


def start_redis():
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return redis, f"redis://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)  # process start-up: nothing to await but the port
    raise SystemExit("redis-server did not start")


def start_gateway(binary, backends, state=""):
    # A port found free can be taken before the gateway binds it (another process's outgoing
    # connection): such a start fails at once, and is tried again on other ports.
    for _ in range(3):
        started = try_start_gateway(binary, backends, state)
        if started is not None:
            return started
    raise SystemExit("spillway serve exited during start-up (three times)")


def try_start_gateway(binary, backends, state):
    port = free_port()
    config = f'[server]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{free_port()}"\n'
    config += f'max_body_bytes = {MAX_BODY_BYTES}\n'
    if state:
        config += f'[state]\n{state}\n'
    config += '[[consumers]]\nname = "sdk-check"\nkey_env = "SDK_CHECK_KEY"\n' + backends
    path = os.path.join(tempfile.mkdtemp(), "spillway.toml")
    with open(path, "w") as f:
        f.write(config)
    env = dict(os.environ, SDK_CHECK_KEY=KEY, RUST_LOG="warn")
    gateway = subprocess.Popen([binary, "serve", "--config", path], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            return None
        try:
            urllib.request.urlopen(url + "/readyz", timeout=1)
            return gateway, url
        except OSError:
            time.sleep(0.05)  # process start-up: nothing to await but the port
    raise SystemExit("spillway serve did not become ready")


def set_faults(sim_url, deployment, faults):
    body = json.dumps({"deployment": deployment, "faults": faults}).encode()
    req = urllib.request.Request(sim_url + "/sim/faults", data=body, method="POST",
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=5)


def main(binary):
    sim, backends, urls = start_sim(binary)
    gateway, url = start_gateway(binary, backends)
    checks = []

    def check(name, fn):
        try:
            fn()
            checks.append((name, None))
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            checks.append((name, e))
            print(f"FAIL {name}: {e!r}")

    azure = openai.AzureOpenAI(azure_endpoint=url, api_key=KEY, api_version=API_VERSION, max_retries=0)
    messages = [{"role": "user", "content": "Say hello"}]

    def chat():
        r = azure.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=5)
        assert r.choices[0].message.content, r
        assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 0, r.usage

    def stream():
        parts = [c.choices[0].delta.content or "" for c in
                 azure.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=6, stream=True)
                 if c.choices]
        assert len([p for p in parts if p]) == 6, parts

    def stream_usage():
        chunks = list(azure.chat.completions.create(
            model="gpt-4o", messages=messages, max_tokens=4, stream=True,
            stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4, chunks[-1]

    def embed():
        r = azure.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
        assert len(r.data) == 2 and len(r.data[0].embedding) == 16, r

    def failover():
        for ptu in ("ptu-eastus", "ptu-swedencentral"):
            set_faults(urls[ptu], "gpt-4o", {"respond_with": {"status": 429, "retry_after_ms": 5000}})
        raw = azure.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, max_tokens=3)
        backend = raw.headers.get("x-spillway-backend")
        assert backend.startswith("payg-"), backend
        assert raw.parse().choices[0].message.content

    def bad_key():
        bad = openai.AzureOpenAI(azure_endpoint=url, api_key="wrong", api_version=API_VERSION, max_retries=0)
        try:
            bad.chat.completions.create(model="gpt-4o", messages=messages)
        except openai.AuthenticationError:
            return
        raise AssertionError("a wrong key was accepted")

    def openai_v1():
        client = openai.OpenAI(base_url=url + "/openai/v1", api_key=KEY, max_retries=0)
        r = client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
        assert r.usage.completion_tokens == 2, r.usage
        models = [m.id for m in client.models.list()]
        assert "gpt-4o" in models, models

    def azure_error(fn):
        """Run fn, which must raise urllib's HTTPError; its status and Azure error code."""
        try:
            fn()
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())["error"]["code"]
        raise AssertionError("the request was accepted")

    def oversized_body():
        # urllib sends the whole body before it reads: the 413 must still be readable.
        body = b" " * (4 * MAX_BODY_BYTES)
        req = urllib.request.Request(f"{url}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}",
                                     data=body, method="POST",
                                     headers={"content-type": "application/json", "api-key": KEY})
        status, code = azure_error(lambda: urllib.request.urlopen(req, timeout=30))
        assert (status, code) == (413, "request_too_large"), (status, code)

    def traversal():
        # urllib sends the path as written; the gateway must not let it leave pool gpt-4o.
        target = f"{url}/openai/deployments/gpt-4o/../../deployments/text-embedding-3-small/embeddings?api-version={API_VERSION}"
        req = urllib.request.Request(target, data=b'{"input":"x"}', method="POST",
                                     headers={"content-type": "application/json", "api-key": KEY})
        status, code = azure_error(lambda: urllib.request.urlopen(req, timeout=10))
        assert (status, code) == (400, "invalid_path"), (status, code)

    def responses_conversation():
        # Ten turns, each through the next of three replicas sharing Redis, some streamed:
        # every follow-up must reach the member that holds the conversation.
        redis, redis_url = start_redis()
        replicas = [start_gateway(binary, backends, f'redis_url = "{redis_url}"') for _ in range(3)]
        try:
            clients = [openai.OpenAI(base_url=u + "/openai/v1", api_key=KEY, max_retries=0)
                       for _, u in replicas]
            previous, ids = None, []
            for turn in range(10):
                client = clients[turn % 3]
                extra = {"previous_response_id": previous} if previous else {}
                if turn % 2:
                    events = list(client.responses.create(
                        model="gpt-4o", input=f"Turn {turn}", max_output_tokens=4, stream=True, **extra))
                    kinds = [e.type for e in events]
                    assert kinds[0] == "response.created" and kinds[-1] == "response.completed" \
                        or kinds[-1] == "response.incomplete", kinds
                    assert "response.output_text.delta" in kinds, kinds
                    response = events[-1].response
                else:
                    response = client.responses.create(
                        model="gpt-4o", input=f"Turn {turn}", max_output_tokens=4, **extra)
                    assert response.output_text, response
                assert response.usage.output_tokens == 4, response.usage
                ids.append(response.id)
                previous = response.id
            for rid in ids:
                for client in clients:
                    assert client.responses.retrieve(rid).id == rid
        finally:
            for gateway, _ in replicas:
                gateway.terminate()
                gateway.wait(10)
            redis.terminate()
            redis.wait(10)

    for name, fn in [("chat", chat), ("stream", stream), ("stream with usage", stream_usage),
                     ("embeddings", embed), ("wrong key is 401", bad_key), ("openai v1 client", openai_v1),
                     ("413 readable by urllib", oversized_body), ("path traversal is 400", traversal),
                     ("responses: ten turns over three replicas on Redis", responses_conversation),
                     ("failover on 429", failover)]:
        check(name, fn)

    gateway.terminate()
    sim.terminate()
    gateway.wait(10)
    sim.wait(10)
    failed = sum(1 for _, e in checks if e)
    print(f"{len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
