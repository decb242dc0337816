"""What a served generation runs: the bundled testbed's sampler or a diffusers pipeline, on the batched transformer.

A generator checks a request's fields (:meth:`check`, before it is queued: a bad request is refused with a message,
never started) and runs one generation in the calling thread (:meth:`generate`), returning ``[B, C, F, H, W]`` in
``[-1, 1]``. Both keep their own per-request state (the testbed's sampler is a function; a pipeline is copied per
request with its own scheduler), so concurrent generations share only the transformer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GenerationSpec", "InvalidRequest", "TestbedGenerator", "PipelineGenerator"]


class InvalidRequest(ValueError):
    """A request the server refuses before running it; the message names the field and what it expects."""


@dataclass(frozen=True)
class GenerationSpec:
    """One generation as a client asked for it (fields a generator does not use must be None)."""

    steps: int
    seeds: tuple[int, ...]
    labels: tuple[tuple[str | int, str | int], ...] | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None


class TestbedGenerator:
    """The bundled testbed (``adacache_compile.testbed``): one video per ``(first, second)`` label pair (names or
    indices; latte-shapes: shape and motion bucket), DDIM / flow-matching Euler with batched CFG (one transformer
    call per step). A ``prompt`` names the labels instead ("disc fast"). ``height`` = ``width``: the frame size
    (default the trained one; another size is captured anew by a torch runtime, and must lie in an exported
    runtime's profile)."""

    kind = "testbed"
    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, testbed):
        self.testbed = testbed
        self.name = testbed.name
        self._sizes: dict[int, Any] = {}

    def check(self, spec: GenerationSpec) -> GenerationSpec:
        family = self.testbed.family
        labels = spec.labels
        if labels is None and spec.prompt is not None:
            labels = (self._labels_of(spec.prompt),)
        if not labels:
            raise InvalidRequest(
                f"{self.name}: give labels=[[first, second], ...] (first of {list(family.first_labels)}, second of "
                f"{list(family.second_labels)}, by name or index) or a prompt naming one of each, e.g. "
                f"'{family.first_labels[0]} {family.second_labels[-1]}'"
            )
        for first, second in labels:
            for label, names, second_label in (
                (first, family.first_labels, False),
                (second, family.second_labels, True),
            ):
                try:
                    index = family.label_index(label, second=second_label)
                except ValueError as e:
                    raise InvalidRequest(str(e)) from None
                if not -1 <= index < len(names):  # -1: the null label
                    raise InvalidRequest(f"{self.name}: label index {label!r} is outside -1..{len(names) - 1}")
        seeds = spec.seeds if len(spec.seeds) != 1 else spec.seeds * len(labels)
        if len(seeds) != len(labels):
            raise InvalidRequest(
                f"{len(labels)} label pairs but {len(spec.seeds)} seeds: give one seed, or one per video"
            )
        patch = int(self.testbed.transformer.config.patch_size)
        size = spec.height or spec.width
        if spec.height is not None and spec.width is not None and spec.height != spec.width:
            raise InvalidRequest(f"{self.name}: frames are square; got height={spec.height}, width={spec.width}")
        if size is not None and (size < 2 * patch or size % patch):
            raise InvalidRequest(
                f"{self.name}: size {size} must be a multiple of the patch size {patch}, at least {2 * patch}"
            )
        if spec.num_frames is not None and spec.num_frames != self.testbed.video_shape[1]:
            raise InvalidRequest(
                f"{self.name}: the model makes {self.testbed.video_shape[1]} frames; num_frames={spec.num_frames}"
            )
        if spec.negative_prompt is not None:
            raise InvalidRequest(
                f"{self.name}: the testbed has no negative prompt (its unconditional branch is the null label)"
            )
        return dataclasses.replace(
            spec, labels=tuple(tuple(pair) for pair in labels), seeds=tuple(seeds), prompt=None, height=size, width=size
        )

    def _labels_of(self, prompt: str) -> tuple[str, str]:
        family = self.testbed.family
        words = prompt.lower().replace(",", " ").split()
        first = [w for w in words if w in family.first_labels]
        second = [w for w in words if w in family.second_labels]
        if len(first) != 1 or len(second) != 1:
            raise InvalidRequest(
                f"{self.name}: prompt {prompt!r} must name one of {list(family.first_labels)} and one of "
                f"{list(family.second_labels)}"
            )
        return first[0], second[0]

    def num_steps(self, spec: GenerationSpec) -> int:
        return spec.steps

    def generate(self, transformer, spec: GenerationSpec) -> torch.Tensor:
        from ..testbed import sample

        return sample(
            transformer,
            self._sized(spec.height),
            list(spec.labels),
            list(spec.seeds),
            spec.steps,
            guidance_scale=spec.guidance_scale,
            progress=False,
        )

    def _sized(self, size: int | None):
        """The testbed with frames of ``size`` (its sampler draws the noise from ``video_shape``)."""
        if size is None or size == self.testbed.video_shape[-1]:
            return self.testbed
        if size not in self._sizes:
            meta = {**self.testbed.meta, "data": {**self.testbed.meta["data"], "size": size}}
            self._sizes[size] = dataclasses.replace(self.testbed, meta=meta)
        return self._sizes[size]


class PipelineGenerator:
    """A diffusers pipeline (``DiffusionPipeline.from_pretrained`` of a ``save_pretrained`` directory): text encoder
    and VAE shared, a shallow copy per request with its own scheduler and the batched transformer, whose scheduler
    tells the request its step count (as :func:`adacache_compile.apply` does). Pipelines that call the transformer
    once per CFG branch name the branches with ``cache_context`` (Wan, HunyuanVideo): each gets its own session.
    ``call_args``: more arguments of every pipeline call (``max_sequence_length``, ...).

    The other modules (VAE, text encoders) are shared, one call at a time: some keep state inside a call (Wan's VAE
    caches its causal convolutions' features on itself while it decodes), so two requests decoding at once would
    mix their videos."""

    kind = "pipeline"

    def __init__(self, pipe, name: str = "pipeline", call_args: dict[str, Any] | None = None):
        self.pipe = pipe
        self.name = name
        self.call_args = dict(call_args or {})
        self._shared = {
            attribute: _OneCallAtATime(module)
            for attribute, module in getattr(pipe, "components", {}).items()
            if isinstance(module, torch.nn.Module) and attribute not in ("transformer", "transformer_2")
        }
        self.device = getattr(pipe, "_execution_device", None) or torch.device("cpu")

    def check(self, spec: GenerationSpec) -> GenerationSpec:
        if not spec.prompt:
            raise InvalidRequest(f"{self.name}: give a prompt (a pipeline takes text, not labels)")
        if spec.labels is not None:
            raise InvalidRequest(f"{self.name}: labels are for the testbed; give a prompt")
        if len(spec.seeds) != 1:
            raise InvalidRequest(f"{self.name}: one seed per request (one video), got {len(spec.seeds)}")
        return spec

    def num_steps(self, spec: GenerationSpec) -> int:
        return spec.steps

    def generate(self, transformer, spec: GenerationSpec) -> torch.Tensor:
        pipe = copy.copy(self.pipe)
        scheduler = copy.deepcopy(self.pipe.scheduler)
        original = scheduler.set_timesteps

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            transformer.announce_timesteps(scheduler.timesteps)
            return result

        scheduler.set_timesteps = set_timesteps
        # object.__setattr__: DiffusionPipeline.__setattr__ would rewrite the shared config.
        object.__setattr__(pipe, "scheduler", scheduler)
        object.__setattr__(pipe, "transformer", transformer)
        for attribute, shared in self._shared.items():
            object.__setattr__(pipe, attribute, shared)
        call: dict[str, Any] = {
            **self.call_args,
            "prompt": spec.prompt,
            "num_inference_steps": spec.steps,
            "generator": torch.Generator(device="cpu").manual_seed(spec.seeds[0]),
            "output_type": "pt",
        }
        for name in ("negative_prompt", "guidance_scale", "height", "width", "num_frames"):
            value = getattr(spec, name)
            if value is not None:
                call[name] = value
        frames = pipe(**call).frames  # [B, F, C, H, W] in [0, 1]
        return frames.permute(0, 2, 1, 3, 4).float() * 2.0 - 1.0


class _OneCallAtATime:
    """A pipeline module shared by concurrent requests: its calls and method calls run one at a time (one lock);
    attribute reads (``config``, ``dtype``) pass through."""

    def __init__(self, module: torch.nn.Module):
        self._module = module
        self._lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._module(*args, **kwargs)

    def __getattr__(self, name: str):
        value = getattr(self._module, name)
        if not callable(value) or isinstance(value, (type, torch.nn.Module)):
            return value

        @functools.wraps(value)
        def locked(*args, **kwargs):
            with self._lock:
                return value(*args, **kwargs)

        return locked
