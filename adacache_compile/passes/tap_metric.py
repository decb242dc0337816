"""Choose the metric tap (first residual branch of the mid-depth block) and its frame layout for MoReg."""

from __future__ import annotations

import logging

import torch.fx as fx

from ..errors import PassError
from ..parallel import MOREG_UNDER_CP
from ..plan import CachePlan, MoRegLayout, PassResult
from ._utils import concrete_shape

__all__ = ["tap_metric", "infer_moreg_layout"]

logger = logging.getLogger(__name__)


def tap_metric(gm: fx.GraphModule, plan: CachePlan) -> PassResult:
    """The reference reads the gated self-attention residual of one mid-depth block (docs/algorithm.md, "The metric
    tap"): here, the residual operand of the first stream add inside the chosen block."""
    block = _tap_block(plan)
    block_nodes = set(block.nodes)
    adds = sorted(
        ((add, stream) for stream in plan.streams for add in stream.residual_adds if add in block_nodes),
        key=lambda item: block.nodes.index(item[0]),
    )
    if not adds:
        raise PassError(
            f"tap_metric: block {block.name!r} has no residual add on the stream (expected x + gate * attn(...)); "
            "choose another tap block with AdaCacheConfig.tap"
        )
    add, stream = adds[0]
    stream_operand = stream.passthrough[add]
    residual = next(a for a in add.args[:2] if a is not stream_operand)
    plan.tap_node = residual
    plan.tap_block = block.name
    if plan.context_parallel is not None:
        plan.moreg_layout, plan.moreg_layout_error = None, MOREG_UNDER_CP
    else:
        _read_moreg_layout(plan, residual)
    logger.info("metric tap: %s (%s), MoReg layout %s", plan.tap, tuple(residual.meta["val"].shape), plan.moreg_layout)
    return PassResult(gm, False)


def _read_moreg_layout(plan: CachePlan, residual: fx.Node) -> None:
    try:
        plan.moreg_layout = infer_moreg_layout(plan, residual)
    except PassError as e:
        plan.moreg_layout, plan.moreg_layout_error = None, str(e)


def _tap_block(plan: CachePlan):
    tap = getattr(plan.config, "tap", None)
    blocks = plan.region_blocks
    if tap is None:
        return blocks[len(blocks) // 2]
    if isinstance(tap, int):
        try:
            return plan.all_blocks[tap]
        except IndexError:
            raise ValueError(
                f"AdaCacheConfig.tap={tap} is out of range: the model has {len(plan.all_blocks)} blocks"
            ) from None
    for b in plan.all_blocks:
        if b.name == tap:
            if b not in blocks:
                raise ValueError(f"AdaCacheConfig.tap={tap!r} is not in the cached region ({plan.region})")
            return b
    raise ValueError(f"AdaCacheConfig.tap={tap!r} names no block; blocks are {plan.blocks}")


def infer_moreg_layout(plan: CachePlan, tap: fx.Node) -> MoRegLayout:
    """Find the frame axis of the tap from the video input's frame count.

    The tap is ``[A, N, C]``; with batch ``B`` and ``T`` latent frames it is frame-major when ``A == B*T`` (tokens of
    one frame in a row: Latte spatial blocks) or ``A == B`` and ``T | N`` (``[B, T*S, C]``: Wan, CogVideoX), and
    token-major when ``N == T`` (``[B*S, T, C]``: Latte temporal blocks). Anything else, or more than one reading,
    raises: MoReg on a wrong frame axis would be nonsense.
    """
    shape = list(concrete_shape(tap))
    if len(shape) != 3:
        raise PassError(f"tap {tap.name} has shape {shape}; MoReg needs a [batch, tokens, channels] tap")
    a, n, _ = shape
    batch, candidates, patch_t = _video_geometry(plan)
    readings = set()
    for t, source in candidates.items():
        if t < 2:
            continue
        src = {"frame_input": source[0], "frame_dim": source[1], "patch_t": patch_t} if source else {}
        if a == batch * t:
            readings.add(MoRegLayout("frame-major", ("-1", "T", "N", "C"), t, n, **src))
        if a == batch and n % t == 0 and n > t:
            readings.add(MoRegLayout("frame-major", ("B", "T", "-1", "C"), t, n // t, **src))
        if n == t and a % batch == 0 and a > batch:
            readings.add(MoRegLayout("token-major", ("B", "-1", "T", "C"), t, a // batch, **src))
    if len(readings) != 1:
        raise PassError(
            f"cannot tell the frame axis of tap {tap.name} {shape} (batch {batch}, frame candidates "
            f"{sorted(candidates)}): {len(readings)} consistent readings"
        )
    return readings.pop()


def _video_geometry(plan: CachePlan) -> tuple[int, dict[int, tuple[int, int] | None], int]:
    """Batch size, candidate latent frame counts (with the input/dim they come from) and the temporal patch."""
    config = getattr(plan.model, "config", None)
    in_channels = getattr(config, "in_channels", None)
    patch_t = getattr(config, "patch_size_t", None)
    patch = getattr(config, "patch_size", None)
    if patch_t is None and isinstance(patch, (tuple, list)) and len(patch) == 3:
        patch_t = patch[0]
    patch_t = int(patch_t or 1)
    inputs = plan.example_inputs
    video_index = next((i for i, t in enumerate(inputs) if t.dim() == 5), None)
    frames: dict[int, tuple[int, int] | None] = {}
    if video_index is not None:
        video = inputs[video_index]
        batch = video.shape[0]
        for dim in (2, 1):  # diffusers video latents are mostly [B, C, F, H, W]; CogVideoX is [B, F, C, H, W]
            if video.shape[dim] != in_channels or video.shape[1] == video.shape[2]:
                frames.setdefault(-(-int(video.shape[dim]) // patch_t), (video_index, dim))
    else:
        batch = inputs[0].shape[0]
        patch_t = 1  # a frame count passed as an argument already counts latent frames after patching
        for key in ("num_frames", "num_frame", "frames", "video_length"):
            if isinstance(plan.call_constants.get(key), int):
                frames.setdefault(plan.call_constants[key], None)
    return batch, frames, patch_t
