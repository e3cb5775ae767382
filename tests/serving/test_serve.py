"""`moda serve`: every endpoint answers on loopback through a real HTTP client; bad input is a 4xx
that names the problem, never a 500."""

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from pipelines.run.demo import free_port
from pipelines.shardio.shards import iter_samples
from serving.predict import MoDESystem
from serving.service import Limits, create_app

pytestmark = pytest.mark.slow
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]


@pytest.fixture(scope="module")
def served(tiny_run):
    system = MoDESystem.load(tiny_run["run_dir"])
    app = create_app(system, Limits(max_body_bytes=200_000, max_images=8, wait_ms=50))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client, system, app
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def images(tiny_data):
    samples = list(iter_samples(tiny_data / "eval" / "shapes" / "00000.tar"))[:4]
    return [s.files["jpg"] for s in samples]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def decoded(raw: bytes) -> Image.Image:
    return Image.open(io.BytesIO(raw)).convert("RGB")


def test_health_and_info_describe_the_system(served):
    client, system, _ = served
    assert client.get("/health").json() == {"status": "ok", "experts": 2}
    info = client.get("/info").json()
    assert [e["name"] for e in info["experts"]] == system.expert_names
    assert info["routing"]["rule"] == "paper" and info["routing"]["lambda"] == system.lam
    assert info["versions"]["open_clip_torch"]


def test_classify_answers_what_the_python_api_answers(served, images):
    client, system, _ = served
    response = client.post("/classify", json={"images": [b64(r) for r in images], "classes": SHAPES, "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    probs, weights = system.classify([decoded(r) for r in images], SHAPES)
    for row, prediction in zip(probs, body["predictions"]):
        order = np.argsort(-row, kind="stable")[:2]
        assert prediction["classes"] == [SHAPES[j] for j in order]
        np.testing.assert_allclose(prediction["scores"], row[order], rtol=1e-4, atol=1e-6)
    assert list(body["routing_weights"].values()) == pytest.approx(weights.tolist())


def test_rank_orders_captions_as_the_python_api(served, images):
    client, system, _ = served
    captions = ["a red circle", "a beach at sunset", "digit seven"]
    body = client.post("/rank", json={"image": b64(images[0]), "captions": captions}).json()
    scores, _ = system.rank_captions(decoded(images[0]), captions)
    assert [r["caption"] for r in body["ranking"]] == [captions[j] for j in np.argsort(-scores, kind="stable")]


def test_embed_returns_each_experts_unit_embeddings(served, images):
    client, system, _ = served
    body = client.post("/embed", json={"images": [b64(images[0])], "experts": ["expert_001"]}).json()
    vector = np.array(body["embeddings"]["expert_001"][0])
    np.testing.assert_allclose(vector, system.embed([decoded(images[0])], [1])["expert_001"][0], atol=1e-5)


def test_concurrent_requests_are_batched_into_fewer_model_calls(served, images):
    client, _, app = served
    batcher = app.app.state.batcher
    before = batcher.calls
    payload = {"images": [b64(images[0])], "classes": SHAPES}
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.post("/classify", json=payload).status_code, range(8)))
    assert codes == [200] * 8
    assert batcher.calls - before < 8 * 2  # 8 requests x 2 experts unbatched


@pytest.mark.parametrize("payload, status, named", [
    ({"images": [b64(b"not an image")], "classes": SHAPES}, 422, "images[0]: not an image"),
    ({"images": ["%%%"], "classes": SHAPES}, 422, "images[0]: not base64"),
    ({"images": None, "classes": []}, 422, "classes"),
    ({"classes": SHAPES}, 422, "images: Field required"),
    ({"images": ["x"], "classes": ["circle", " "]}, 422, "classes[1] is blank"),
    ({"images": ["x"], "classes": SHAPES, "templates": ["a photo"]}, 422, "templates[0]"),
    ({"images": ["x"], "classes": SHAPES, "top_k": 0}, 422, "top_k"),
    ({"images": ["x"], "classes": SHAPES, "top_experts": 3}, 422, "top_experts: 3"),
    ({"images": ["x"], "classes": SHAPES, "clases": ["a"]}, 422, "clases: not a field"),
    ({"images": [b64(b"x")] * 9, "classes": SHAPES}, 413, "at most 8"),
])
def test_bad_classify_input_is_a_4xx_naming_the_problem(served, images, payload, status, named):
    client, _, _ = served
    if payload.get("images") is None and "images" in payload:
        payload = {**payload, "images": [b64(images[0])]}
    if payload.get("images") == ["x"]:
        payload = {**payload, "images": [b64(images[0])]}
    response = client.post("/classify", json=payload)
    assert response.status_code == status, response.text
    assert named in response.json()["error"]


def test_a_body_that_is_not_json_or_too_large_is_refused(served):
    client, _, _ = served
    response = client.post("/classify", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]
    big = client.post("/classify", json={"images": ["A" * 300_000], "classes": SHAPES})
    assert big.status_code == 413 and "over the limit of 200000 bytes" in big.json()["error"]

    def streamed():  # no content-length: counted as it arrives
        yield b'{"images": ["'
        for _ in range(30):
            yield b"A" * 10_000
        yield b'"], "classes": ["a"]}'

    chunked = client.post("/classify", content=streamed(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "over the limit" in chunked.json()["error"]


def test_other_endpoints_refuse_bad_input_by_name(served, images):
    client, _, _ = served
    assert "captions" in client.post("/rank", json={"image": b64(images[0]), "captions": []}).json()["error"]
    assert client.post("/rank", json={"image": b64(b"zz"), "captions": ["a"]}).status_code == 422
    unknown = client.post("/embed", json={"images": [b64(images[0])], "experts": ["expert_009"]})
    assert unknown.status_code == 422 and "'expert_009' is not an expert" in unknown.json()["error"]
    assert client.get("/nowhere").status_code == 404 and client.get("/classify").status_code == 405
