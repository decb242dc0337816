"""The HTTP API of ``adacache-compile serve`` (FastAPI; run by uvicorn): a thin layer over
:class:`~.service.GenerationService`.

=====================================  ==============================================================================
``POST /v1/generations``               queue a generation (202 with its id; ``"wait": true`` answers when it is done);
                                       422 a bad field, 429 the queue is full, 503 shutting down
``GET /v1/generations/{id}``           status, progress (step of N), computed steps per branch, error; the video
                                       once done (``?video=uint8|float32|gif|none``)
``GET /v1/health``                     running and queued jobs, limits, served configs
``GET /v1/configs``                    the served configs (name -> AdaCacheConfig fields)
``GET /v1/stats``                      the batched transformer's stats (requests in flight, cache bytes, batches)
=====================================  ==============================================================================
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
from typing import Any, Literal

import torch
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field

from .generators import GenerationSpec, InvalidRequest
from .service import FAILED, GenerationService, QueueFull, ServiceClosed

__all__ = ["GenerationRequest", "create_app", "encode_video"]

VideoFormat = Literal["uint8", "float32", "gif", "none"]


class GenerationRequest(BaseModel):
    """A generation request's JSON body."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="text (a pipeline), or label names (the testbed: 'disc fast')")
    labels: list[tuple[str | int, str | int]] | None = Field(None, description="testbed: (first, second) pairs")
    negative_prompt: str | None = None
    seed: int = 0
    seeds: list[int] | None = Field(None, description="one per video (testbed); default: seed")
    steps: int = Field(30, ge=1, le=1000, description="denoising steps N")
    config: str | None = Field(None, description="a served config name (GET /v1/configs); default: the server's")
    size: int | None = Field(None, ge=1, description="height = width")
    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    num_frames: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    wait: bool = Field(False, description="answer when the generation is done (else 202 at once)")
    video: VideoFormat = Field("uint8", description="with wait: the video's encoding")

    def spec(self) -> GenerationSpec:
        if self.size is not None and (self.height is not None or self.width is not None):
            raise InvalidRequest("give size, or height and width, not both")
        return GenerationSpec(
            steps=self.steps,
            seeds=tuple(self.seeds) if self.seeds is not None else (self.seed,),
            labels=None if self.labels is None else tuple(tuple(pair) for pair in self.labels),
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            guidance_scale=self.guidance_scale,
            height=self.size if self.size is not None else self.height,
            width=self.size if self.size is not None else self.width,
            num_frames=self.num_frames,
        )


def encode_video(video: torch.Tensor, video_format: str) -> dict[str, Any] | None:
    """``video`` [B, C, F, H, W] in [-1, 1] for JSON: ``float32`` (its values, little-endian, C order), ``uint8``
    (frames [B, F, H, W, C]) or ``gif`` (one GIF per video), base64; None for ``none``."""
    if video_format == "none":
        return None
    if video_format == "float32":
        data = video.float().contiguous().numpy().astype("<f4").tobytes()
        return {"format": "float32", "shape": list(video.shape), "data": base64.b64encode(data).decode()}
    from ..testbed.sample import to_uint8_frames

    frames = [to_uint8_frames(v) for v in video]
    if video_format == "uint8":
        import numpy as np

        stacked = np.stack(frames)
        return {"format": "uint8", "shape": list(stacked.shape), "data": base64.b64encode(stacked.tobytes()).decode()}
    import imageio.v3 as iio

    gifs = []
    for clip in frames:
        buffer = io.BytesIO()
        iio.imwrite(buffer, clip, extension=".gif", duration=250, loop=0)
        gifs.append(base64.b64encode(buffer.getvalue()).decode())
    return {"format": "gif", "data": gifs}


def create_app(service: GenerationService, *, close_on_shutdown: bool = True) -> FastAPI:
    """The FastAPI app of ``service``; with ``close_on_shutdown`` the server's shutdown closes the service (running
    jobs finish, queued ones fail, the engine stops)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_on_shutdown:
            service.close()

    app = FastAPI(title="adacache-compile serve", lifespan=lifespan)

    def job_answer(job, video_format: str) -> dict[str, Any]:
        answer = job.summary()
        if job.video is not None:
            answer["video"] = encode_video(job.video, video_format)
        return answer

    @app.post("/v1/generations", status_code=202)
    def create_generation(body: GenerationRequest, response: Response):
        try:
            job = service.submit(body.spec(), body.config)
        except InvalidRequest as e:
            raise HTTPException(status_code=422, detail=str(e)) from None
        except QueueFull as e:
            raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": "1"}) from None
        except ServiceClosed as e:
            raise HTTPException(status_code=503, detail=str(e)) from None
        if not body.wait:
            return job.summary()
        job.done.wait()
        if job.status == FAILED:
            raise HTTPException(status_code=500, detail=job.summary())
        response.status_code = 200
        return job_answer(job, body.video)

    @app.get("/v1/generations/{job_id}")
    def read_generation(job_id: str, video: VideoFormat = "uint8"):
        job = service.get(job_id)
        if job is None:
            raise HTTPException(
                status_code=404,
                detail=f"no generation {job_id!r} (unknown, or forgotten: the server keeps the newest finished ones)",
            )
        return job_answer(job, video)

    @app.get("/v1/health")
    def health():
        return service.health()

    @app.get("/v1/configs")
    def configs():
        return {name: config.to_dict() for name, config in sorted(service.configs.items())}

    @app.get("/v1/stats")
    def stats():
        return json_safe(service.batched.stats)

    return app


def json_safe(value):
    """``value`` with every non-finite float as its string (``"inf"``, ``"nan"``): strict JSON has no such numbers,
    and a metric or forecast error can be one."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
