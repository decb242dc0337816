"""``adacache-compile serve`` on the testbed: the service its CLI arguments build, behind a real uvicorn server on
127.0.0.1 (a free port), talked to over HTTP by this test; concurrent requests equal to their solo runs, progress,
the bounded queue's refusal, a failing request alone, bad requests refused, and the shutdown."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from serving_helpers import assert_video_close

from adacache_compile.testbed import CHECKPOINT_DIR

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason="testbed checkpoint not shipped in this tree"
)

# Three requests with their own presets and N (the served default is fast-50+f2).
REQUESTS = [
    {"labels": [["disc", "fast"]], "seed": 1, "steps": 10},
    {"labels": [["square", 1]], "seed": 2, "steps": 12, "config": "slow-50+f2"},
    {"prompt": "triangle slow", "seed": 3, "steps": 6, "config": "uncached"},
]
MAX_CONCURRENT, MAX_QUEUE = 3, 1


@pytest.fixture(scope="module")
def service():
    from adacache_compile.cli import build_parser
    from adacache_compile.serving.command import build_service

    args = build_parser().parse_args(
        ["serve", "--testbed", "latte-shapes", "--max-concurrent", str(MAX_CONCURRENT), "--max-queue", str(MAX_QUEUE)]
    )
    service = build_service(args)
    yield service
    service.close()


@pytest.fixture(scope="module")
def server(service):
    from adacache_compile.serving.http import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "uvicorn did not start within 30 s"
    yield server, thread, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=60)


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def video_of(answer: dict) -> torch.Tensor:
    video = answer["video"]
    assert video["format"] == "float32"
    values = np.frombuffer(base64.b64decode(video["data"]), dtype="<f4").reshape(video["shape"])
    return torch.from_numpy(values.copy())


def generate(base: str, body: dict) -> tuple[int, dict]:
    return call(f"{base}/v1/generations", {**body, "wait": True, "video": "float32"})


@pytest.fixture(scope="module")
def solo(server):
    _, _, base = server
    answers = []
    for body in REQUESTS:
        status, answer = generate(base, body)
        assert status == 200, answer
        answers.append(answer)
    return answers


def concurrently(base: str, bodies: list[dict]) -> list[tuple[int, dict]]:
    answers: list = [None] * len(bodies)

    def one(index: int) -> None:
        answers[index] = generate(base, bodies[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def assert_same(answer: dict, solo_answer: dict) -> None:
    assert answer["computed_steps"] == solo_answer["computed_steps"]
    assert_video_close(video_of(answer), video_of(solo_answer), answer["id"])


def test_concurrent_requests_equal_their_solo_runs(server, solo, service):
    _, _, base = server
    steps_before = service.batched.stats["batches"]["steps"]
    answers = concurrently(base, REQUESTS)
    for (status, answer), solo_answer, body in zip(answers, solo, REQUESTS):
        assert status == 200, answer
        assert answer["status"] == "done" and answer["progress"] == {"step": body["steps"], "num_steps": body["steps"]}
        assert_same(answer, solo_answer)
    assert answers[2][1]["computed_steps"] == {"default": [1, 2, 3, 4, 5, 6]}  # uncached
    batches = service.batched.stats["batches"]
    assert batches["steps"] - steps_before < sum(body["steps"] for body in REQUESTS)  # steps were shared


def test_progress_is_reported_while_running(server):
    _, _, base = server
    status, queued = call(f"{base}/v1/generations", {**REQUESTS[1], "steps": 16})
    assert status == 202 and queued["status"] in ("queued", "running")
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status, answer = call(f"{base}/v1/generations/{queued['id']}?video=none")
        assert status == 200
        seen.append(answer["progress"]["step"])
        if answer["status"] == "done":
            break
        time.sleep(0.02)
    assert answer["status"] == "done" and "video" in answer and answer["video"] is None
    assert seen == sorted(seen) and seen[-1] == 16 and any(0 < step < 16 for step in seen)
    status, answer = call(f"{base}/v1/generations/{queued['id']}?video=gif")
    assert base64.b64decode(answer["video"]["data"][0])[:6] == b"GIF89a"


def test_the_bounded_queue_refuses_when_full(server):
    _, _, base = server
    body = {"labels": [["cross", 0]], "steps": 8}
    accepted, refused = [], []
    for seed in range(MAX_CONCURRENT + MAX_QUEUE + 1):
        status, answer = call(f"{base}/v1/generations", {**body, "seed": seed})
        (accepted if status == 202 else refused).append((status, answer))
    assert len(accepted) == MAX_CONCURRENT + MAX_QUEUE
    [(status, answer)] = refused
    assert status == 429 and "queue is full" in answer["detail"] and "retry later" in answer["detail"]
    for _, job in accepted:  # the accepted ones all finish
        deadline = time.monotonic() + 300
        while call(f"{base}/v1/generations/{job['id']}?video=none")[1]["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_failing_request_fails_alone(server, solo):
    _, _, base = server
    # A guidance scale of 1e38 overflows the latents to Inf and then NaN: that request fails with the reason, the
    # others in flight with it are their solo runs.
    bodies = [{**REQUESTS[0], "guidance_scale": 1e38}, REQUESTS[1], REQUESTS[2]]
    (bad_status, bad), *good = concurrently(base, bodies)
    assert bad_status == 500
    assert bad["detail"]["status"] == "failed" and "NaN/Inf" in bad["detail"]["error"]
    for (status, answer), solo_answer in zip(good, solo[1:]):
        assert status == 200
        assert_same(answer, solo_answer)


def test_bad_requests_are_refused_with_a_reason(server):
    _, _, base = server
    cases = [
        ({"labels": [["disc", 1]], "config": "fast-50+moreg"}, "not served"),
        ({"labels": [["disk", 1]]}, "unknown label 'disk'"),
        ({"prompt": "a cat"}, "must name one of"),
        ({"labels": [["disc", 1]], "seeds": [1, 2]}, "seeds"),
        ({"labels": [["disc", 1]], "size": 15}, "multiple of the patch size"),
    ]
    for body, reason in cases:
        status, answer = call(f"{base}/v1/generations", body)
        assert status == 422 and reason in answer["detail"], (body, answer)
    assert call(f"{base}/v1/generations", {"labels": [["disc", 1]], "steps": 0})[0] == 422
    assert call(f"{base}/v1/generations", {"labels": [["disc", 1]], "colour": "red"})[0] == 422
    status, answer = call(f"{base}/v1/generations/gen-999999")
    assert status == 404 and "gen-999999" in answer["detail"]


def test_health_configs_and_stats(server):
    _, _, base = server
    status, answer = generate(base, {"labels": [["disc", 1]], "steps": 3})  # the stats below count its steps
    assert status == 200, answer
    status, health = call(f"{base}/v1/health")
    assert status == 200 and health["status"] == "ok"
    assert health["max_concurrent"] == MAX_CONCURRENT and health["max_queue"] == MAX_QUEUE
    assert "fast-50+f2" in health["configs"] and "uncached" in health["configs"]
    assert not any("moreg" in name for name in health["configs"])
    status, configs = call(f"{base}/v1/configs")
    assert configs["default"]["forecast_order"] == 2
    status, stats = call(f"{base}/v1/stats")
    assert status == 200 and stats["batches"]["steps"] >= 3 and stats["finished"]


def test_shutdown(server, service):
    from adacache_compile.serving import GenerationSpec, ServiceClosed

    uvicorn_server, thread, base = server
    uvicorn_server.should_exit = True
    thread.join(timeout=60)
    assert not thread.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/v1/health", timeout=5)
    assert service.health()["status"] == "closing"  # the app's shutdown closed the service and its engine
    with pytest.raises(ServiceClosed, match="shutting down"):
        service.submit(GenerationSpec(steps=4, seeds=(0,), labels=(("disc", 1),)))
