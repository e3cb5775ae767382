"""`moda serve SYSTEM`: the routed ensemble over HTTP (FastAPI on uvicorn, both installed with Prefect).

    GET  /health     {"status": "ok", "experts": n}
    GET  /info       experts, routing (rule, lambda, its source), encoder, versions, fingerprint
    POST /classify   {"images": [base64, ...], "classes": [...], "templates"?: [...], "top_k"?: 5,
                      "top_experts"?: k}  -> per image the top classes and probabilities, the weights
    POST /rank       {"image": base64, "captions": [...]} -> every caption's score, best first
    POST /embed      {"images": [base64, ...], "experts"?: [names]} -> each expert's unit embeddings

Images are base64 (a `data:image/...;base64,` prefix is accepted), as CLIP services take them in
JSON. Why the shape:
- Requests are batched into model calls: each request's decoded, preprocessed images wait at
  most `wait_ms` in one queue; the model thread takes up to `max_batch` images at a time from every
  waiting request and runs each expert once over them. Under load the model runs full batches;
  alone a request waits `wait_ms` at most.
- A class list's routing and text features are computed once and kept (`text_cache` lists).
- Bad input is the client's to fix and is told so: a 4xx whose `error` names the field, the image
  (by its index) and what is wrong. An image that does not decode, an empty class list, a template
  without `{}`, a body over `max_body_bytes`, a field the endpoint does not take: 413 or 422, never
  a 500 with a traceback. A 500 says only "internal error" and its type (the traceback goes to the
  server's log).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from evaluation.clip_features import inference, to_device
from evaluation.image_stream import without_address
from evaluation.tasks import check_template
from serving.export import versions
from serving.predict import Classifier, MoDESystem

LOG = logging.getLogger("moda.serve")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is named, not ignored


def nonblank(values: list[str], what: str) -> list[str]:
    blank = [i for i, v in enumerate(values) if not v.strip()]
    if blank:
        raise ValueError(f"{what}[{blank[0]}] is blank")
    return values


class ClassifyRequest(Strict):
    images: list[str] = Field(min_length=1)
    classes: list[str] = Field(min_length=1)
    templates: list[str] | None = None
    top_k: int = Field(5, ge=1)
    top_experts: int | None = Field(None, ge=1)

    @field_validator("classes")
    @classmethod
    def _classes(cls, value: list[str]) -> list[str]:
        return nonblank(value, "classes")

    @field_validator("templates")
    @classmethod
    def _templates(cls, value: list[str] | None) -> list[str] | None:
        for i, template in enumerate(value or []):
            check_template(template, f"templates[{i}]")  # a TaskError, a ValueError: 422 naming it
        if value is not None and not value:
            raise ValueError("templates is empty: leave it out for the default template")
        return value


class RankRequest(Strict):
    image: str
    captions: list[str] = Field(min_length=1)

    @field_validator("captions")
    @classmethod
    def _captions(cls, value: list[str]) -> list[str]:
        return nonblank(value, "captions")


class EmbedRequest(Strict):
    images: list[str] = Field(min_length=1)
    experts: list[str] | None = None


class BadInput(ValueError):
    """A request the client must fix: 422 (or `status`) with this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 << 20
    max_images: int = 64
    max_classes: int = 5000
    max_batch: int = 64
    wait_ms: float = 5.0
    text_cache: int = 64


def decode_image(data: str, where: str) -> Image.Image:
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{where}: not base64 (send the image file's bytes base64-encoded)") from None
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad data
        raise BadInput(f"{where}: not an image that decodes ({type(err).__name__}: {without_address(err)})") from None


class Batcher:
    """Image features for many requests in few model calls (see the module docstring)."""

    def __init__(self, system: MoDESystem, limits: Limits):
        self.system, self.limits = system, limits
        self.queue: asyncio.Queue = asyncio.Queue()
        self.calls = 0  # model calls made (each expert over one batch counts one), for /info and tests

    async def features(self, experts: list[int], pixels) -> list[np.ndarray]:
        """Each expert's (N, D) unit features of the preprocessed `pixels` (N, 3, H, W)."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((tuple(experts), pixels, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiting = [await self.queue.get()]
            deadline = loop.time() + self.limits.wait_ms / 1000
            while sum(len(p) for _, p, _ in waiting) < self.limits.max_batch:
                try:
                    waiting.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(self.encode, waiting)
            except Exception as err:  # the requests get the error; the batcher lives on
                for _, _, future in waiting:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, _, future), result in zip(waiting, results):
                if not future.done():
                    future.set_result(result)

    def encode(self, waiting: list) -> list[list[np.ndarray]]:
        """One forward pass per expert over every waiting request that needs it."""
        import torch

        needed = sorted({e for experts, _, _ in waiting for e in experts})
        out: list[dict[int, np.ndarray]] = [{} for _ in waiting]
        with inference(self.system.device):
            for e in needed:
                users = [i for i, (experts, _, _) in enumerate(waiting) if e in experts]
                pixels = to_device(torch.cat([waiting[i][1] for i in users]), self.system.device)
                feats = torch.nn.functional.normalize(self.system.model(e).model.encode_image(pixels).float(), dim=-1)
                self.calls += 1
                feats = feats.cpu().numpy()
                start = 0
                for i in users:
                    n = len(waiting[i][1])
                    out[i][e] = feats[start:start + n]
                    start += n
        return [[o[e] for e in experts] for o, (experts, _, _) in zip(out, waiting)]


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413 before it is parsed, whether
    the client declared its length or streamed it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"error": self.message(int(declared))}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # the app's body reader turns it into the 413 response
                raise HTTPException(413, self.message(seen))
            return message

        await self.app(scope, counted, send)

    def message(self, size: int) -> str:
        return (f"request body of {size} bytes or more is over the limit of {self.limit} bytes: send fewer or "
                "smaller images a request (moda serve --max-body-mb)")


def field_message(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
    if error.get("type") == "extra_forbidden":
        return f"{where}: not a field of this endpoint"
    if error.get("type") == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', error.get('msg'))})"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}"


def create_app(system: MoDESystem, limits: Limits = Limits()) -> FastAPI:
    batcher = Batcher(system, limits)
    text_cache: OrderedDict = OrderedDict()
    loop_task: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop_task["task"] = asyncio.create_task(batcher.run())
        yield
        loop_task["task"].cancel()

    app = FastAPI(title="moda", description="A Mixture of Data Experts CLIP system", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return JSONResponse({"error": "; ".join(field_message(e) for e in errors[:5])}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        LOG.exception("moda serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's log has the details"},
                            status_code=500)

    async def pixels_of(images: list[str]):
        if len(images) > limits.max_images:
            raise BadInput(f"images: {len(images)} images, at most {limits.max_images} a request", 413)

        def prepare():
            import torch

            decoded = [decode_image(data, f"images[{i}]") for i, data in enumerate(images)]
            return torch.stack([system.preprocess(image) for image in decoded])

        return await asyncio.to_thread(prepare)

    async def classifier(classes: list[str], templates: list[str] | None, top_experts: int | None) -> Classifier:
        key = (tuple(classes), tuple(templates or ()), top_experts)
        if key not in text_cache:
            text_cache[key] = await asyncio.to_thread(system.classifier, classes, templates, top_experts)
            while len(text_cache) > limits.text_cache:
                text_cache.popitem(last=False)
        text_cache.move_to_end(key)
        return text_cache[key]

    @app.get("/health")
    async def health():
        return {"status": "ok", "experts": len(system.expert_names)}

    @app.get("/info")
    async def info():
        spec = system.spec
        return {"experts": [{"name": name, "fine_clusters": np.flatnonzero(owned).tolist()}
                            for name, owned in zip(spec.expert_names, spec.owns)],
                "routing": {"rule": system.routing, "lambda": system.lam, "lambda_source": spec.lambda_source,
                            "fine_clusters": int(spec.fine_centroids.shape[0])},
                "encoder": {"model": spec.encoder.model, "pooling": spec.encoder.pooling},
                "fingerprint": spec.fingerprint, "device": system.device, "versions": versions(),
                "limits": limits.__dict__, "model_calls": batcher.calls}

    @app.post("/classify")
    async def classify(body: ClassifyRequest):
        if len(body.classes) > limits.max_classes:
            raise BadInput(f"classes: {len(body.classes)} classes, at most {limits.max_classes} a request", 413)
        if body.top_experts is not None and body.top_experts > len(system.expert_names):
            raise BadInput(f"top_experts: {body.top_experts}, but the system has {len(system.expert_names)} experts")
        pixels = await pixels_of(body.images)
        ready = await classifier(body.classes, body.templates, body.top_experts)
        probs = system.scores(ready, await batcher.features(ready.experts, pixels))
        k = min(body.top_k, len(body.classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return {"predictions": [{"classes": [body.classes[j] for j in row], "scores": probs[i, row].tolist()}
                                for i, row in enumerate(order)],
                "routing_weights": dict(zip(system.expert_names, ready.weights.tolist())),
                "experts_run": [system.expert_names[e] for e in ready.experts]}

    @app.post("/rank")
    async def rank(body: RankRequest):
        image = await asyncio.to_thread(decode_image, body.image, "image")
        scores, weights = await asyncio.to_thread(system.rank_captions, image, body.captions)
        order = np.argsort(-scores, kind="stable")
        return {"ranking": [{"caption": body.captions[j], "score": float(scores[j])} for j in order],
                "routing_weights": dict(zip(system.expert_names, weights.tolist()))}

    @app.post("/embed")
    async def embed(body: EmbedRequest):
        names = body.experts or system.expert_names
        unknown = [n for n in names if n not in system.expert_names]
        if unknown:
            raise BadInput(f"experts: {unknown[0]!r} is not an expert of this system "
                           f"({', '.join(system.expert_names)})")
        experts = [system.expert_names.index(n) for n in names]
        feats = await batcher.features(experts, await pixels_of(body.images))
        return {"embeddings": {name: f.tolist() for name, f in zip(names, feats)}}

    return BodyLimitApp(app, limits.max_body_bytes)


class BodyLimitApp(BodyLimit):
    """The app behind its body limit, with the FastAPI app at `.app` (routes, state)."""
