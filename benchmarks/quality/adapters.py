"""What the peers need from each testbed's transformer: the adapters their documented APIs ask for.

- :class:`LatteLayers`: Latte with one block list. Latte's forward zips two lists (spatial ``transformer_blocks`` on
  ``[B*F, S, C]``, ``temporal_transformer_blocks`` on ``[B*S, F, C]``) and changes the layout between each pair, so a
  hook that caches "first block to last block" (cache-dit, diffusers' FirstBlockCache / MagCache / SeaCache) takes a
  residual across two layouts. The view holds one list, ``layers``, of whole Latte layers (spatial + temporal block,
  :class:`LatteLayer`) and runs Latte's forward over it: bitwise the same computation on the same modules (tested).
  It is a diffusers ``CacheMixin`` (``enable_cache``, ``cache_context``) and registers its layer's block metadata,
  the generic path of the block-stack hooks. LTX-Video's transformer already has one list (``transformer_blocks``).
- :func:`raw_vision_callback`: SeaCache's ``raw_vision_callback``, the latents being denoised as ``(C, T, H, W)``
  tensors; LTX's transformer is called on packed tokens, which the callback unpacks.
- :func:`noise_levels`: the ``sigma`` SeaCache reads from ``cache_context`` at each step.
- :data:`PEER_SPECS`: per testbed, the module names and settings of the hooks that select modules by name, and why
  what does not apply does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.cache_utils import CacheMixin

__all__ = [
    "LatteLayer",
    "LatteLayers",
    "PackedVideoLatents",
    "PeerSpec",
    "PEER_SPECS",
    "peer_spec",
    "layer_stack",
    "raw_vision_callback",
    "noise_levels",
    "instance_state",
    "restore_instance_state",
]


class LatteLayer(torch.nn.Module):
    """One Latte layer as one block: the spatial block on ``[B*F, S, C]``, the temporal block on ``[B*S, F, C]``
    (layer 0 adds the temporal position embedding first), back to ``[B*F, S, C]``. Line for line the body of
    ``LatteTransformer3DModel.forward``'s loop (inference path, temporal attention on)."""

    def __init__(self, spatial: torch.nn.Module, temporal: torch.nn.Module, first: bool):
        super().__init__()
        self.spatial, self.temporal, self.first = spatial, temporal, first

    def forward(
        self,
        hidden_states,
        *,
        encoder_hidden_states,
        encoder_attention_mask,
        timestep_spatial,
        timestep_temp,
        batch_size,
        num_frame,
        temp_pos_embed,
    ):
        hidden_states = self.spatial(
            hidden_states, None, encoder_hidden_states, encoder_attention_mask, timestep_spatial, None, None
        )
        hidden_states = hidden_states.reshape(batch_size, -1, hidden_states.shape[-2], hidden_states.shape[-1])
        hidden_states = hidden_states.permute(0, 2, 1, 3)
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-2], hidden_states.shape[-1])
        if self.first and num_frame > 1:
            hidden_states = hidden_states + temp_pos_embed.to(hidden_states.dtype)
        hidden_states = self.temporal(hidden_states, None, None, None, timestep_temp, None, None)
        hidden_states = hidden_states.reshape(batch_size, -1, hidden_states.shape[-2], hidden_states.shape[-1])
        hidden_states = hidden_states.permute(0, 2, 1, 3)
        return hidden_states.reshape(-1, hidden_states.shape[-2], hidden_states.shape[-1])


def _register_layer_metadata() -> None:
    """Tell diffusers' block-stack hooks what a :class:`LatteLayer` takes and returns (hidden states in, hidden states
    out, no encoder stream): the "block metadata" their generic path reads from ``TransformerBlockRegistry``."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    TransformerBlockRegistry.register(
        LatteLayer, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    )


class LatteLayers(torch.nn.Module, CacheMixin):
    """A view of a diffusers ``LatteTransformer3DModel`` with one block list, ``layers``, of whole Latte layers.

    ``forward`` is Latte's forward with its loop over ``layers``: the same computation (bitwise, checked in
    tests/test_bench.py), on the same modules and weights; the transformer itself is not modified. cache-dit patches
    ``layers``; diffusers' hooks are enabled on the view (``enable_cache``), which finds ``layers`` among its block
    list names.
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        _register_layer_metadata()
        self.transformer = transformer
        self.config = transformer.config
        self.layers = torch.nn.ModuleList(
            LatteLayer(spatial, temporal, first=index == 0)
            for index, (spatial, temporal) in enumerate(
                zip(transformer.transformer_blocks, transformer.temporal_transformer_blocks)
            )
        )

    def forward(
        self, hidden_states, timestep=None, encoder_hidden_states=None, encoder_attention_mask=None, return_dict=True
    ):
        model = self.transformer
        batch_size, channels, num_frame, height, width = hidden_states.shape
        hidden_states = hidden_states.permute(0, 2, 1, 3, 4).reshape(-1, channels, height, width)
        height, width = (
            hidden_states.shape[-2] // model.config.patch_size,
            hidden_states.shape[-1] // model.config.patch_size,
        )
        num_patches = height * width
        hidden_states = model.pos_embed(hidden_states)
        added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        timestep, embedded_timestep = model.adaln_single(
            timestep, added_cond_kwargs=added_cond_kwargs, batch_size=batch_size, hidden_dtype=hidden_states.dtype
        )
        encoder_hidden_states = model.caption_projection(encoder_hidden_states)
        encoder_hidden_states_spatial = encoder_hidden_states.repeat_interleave(
            num_frame, dim=0, output_size=encoder_hidden_states.shape[0] * num_frame
        ).view(-1, encoder_hidden_states.shape[-2], encoder_hidden_states.shape[-1])
        timestep_spatial = timestep.repeat_interleave(num_frame, dim=0, output_size=timestep.shape[0] * num_frame).view(
            -1, timestep.shape[-1]
        )
        timestep_temp = timestep.repeat_interleave(
            num_patches, dim=0, output_size=timestep.shape[0] * num_patches
        ).view(-1, timestep.shape[-1])
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                encoder_hidden_states=encoder_hidden_states_spatial,
                encoder_attention_mask=encoder_attention_mask,
                timestep_spatial=timestep_spatial,
                timestep_temp=timestep_temp,
                batch_size=batch_size,
                num_frame=num_frame,
                temp_pos_embed=model.temp_pos_embed,
            )
        embedded_timestep = embedded_timestep.repeat_interleave(
            num_frame, dim=0, output_size=embedded_timestep.shape[0] * num_frame
        ).view(-1, embedded_timestep.shape[-1])
        shift, scale = (model.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        hidden_states = model.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale) + shift
        hidden_states = model.proj_out(hidden_states)
        if model.adaln_single is None:
            height = width = int(hidden_states.shape[1] ** 0.5)
        hidden_states = hidden_states.reshape(
            shape=(-1, height, width, model.config.patch_size, model.config.patch_size, model.out_channels)
        )
        hidden_states = torch.einsum("nhwpqc->nchpwq", hidden_states)
        output = hidden_states.reshape(
            shape=(-1, model.out_channels, height * model.config.patch_size, width * model.config.patch_size)
        )
        output = output.reshape(batch_size, -1, output.shape[-3], output.shape[-2], output.shape[-1]).permute(
            0, 2, 1, 3, 4
        )
        if not return_dict:
            return (output,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=output)


def _call_argument(name: str, args: tuple, kwargs: dict, position: int | None = None):
    if name in kwargs:
        return kwargs[name]
    if position is not None and len(args) > position:
        return args[position]
    raise ValueError(f"the transformer call has no {name!r} argument")


def _video_latents(module, args, kwargs) -> list[torch.Tensor]:
    """SeaCache ``raw_vision_callback`` of a transformer called on ``[B, C, F, H, W]`` latents (Latte): one
    ``(C, T, H, W)`` tensor per batch entry (both CFG halves: the same latent, as the pipeline batches it)."""
    hidden_states = _call_argument("hidden_states", args, kwargs, position=0)
    if hidden_states.dim() != 5:
        raise ValueError(f"expected hidden_states [B, C, F, H, W], got shape {tuple(hidden_states.shape)}")
    return list(hidden_states.unbind(0))


@dataclass(frozen=True)
class PackedVideoLatents:
    """SeaCache ``raw_vision_callback`` of a transformer called on packed tokens, as ``LTXPipeline`` calls
    ``LTXVideoTransformer3DModel``: the tokens ``[B, F/pt * H/p * W/p, C * pt * p * p]`` of the call, with the token
    grid given by its ``num_frames`` / ``height`` / ``width``, unpacked into one ``(C, T, H, W)`` latent per batch
    entry (the patch sizes are the testbed's packing, not the transformer's config, whose own patch sizes are 1)."""

    patch_size_t: int
    patch_size: int

    def __call__(self, module, args, kwargs) -> list[torch.Tensor]:
        from adacache_compile.testbed.families import unpack_tokens

        tokens = _call_argument("hidden_states", args, kwargs, position=0)
        grid = tuple(int(_call_argument(name, args, kwargs)) for name in ("num_frames", "height", "width"))
        return list(unpack_tokens(tokens, grid, self.patch_size_t, self.patch_size).unbind(0))


@dataclass(frozen=True)
class PeerSpec:
    """How the peers are applied to one testbed's transformer.

    ``layer_list``: the one block list of whole layers that the block-stack hooks and cache-dit cache
    (:func:`layer_stack`); ``cache_dit_pattern``: cache-dit's ``ForwardPattern`` of those blocks.
    ``taylorseer_units``: ``(label, cache_identifiers)`` for TaylorSeer (``re.fullmatch`` on module names).
    ``pab_ranges``: PyramidAttentionBroadcast ``(spatial, temporal, cross)`` skip ranges, None where that kind of
    attention cannot be told apart (with ``pab_identifiers`` overriding its name patterns); ``faster_cache``:
    whether FasterCache's denoiser hook can read the transformer's output as frames. ``candidates``: the other hooks
    tried (:func:`diffusers_hooks.hook_candidates`) to record why they do not apply; ``not_applicable``: settings that
    do not apply for a reason known from the model's structure.
    """

    layer_list: str
    cache_dit_pattern: str
    taylorseer_units: tuple[tuple[str, tuple[str, ...]], ...]
    pab_ranges: tuple[tuple[int | None, int | None, int | None], ...]
    pab_identifiers: dict = field(default_factory=dict)
    faster_cache: bool = True
    candidates: tuple[str, ...] = ()
    not_applicable: dict = field(default_factory=dict)


_SEPARATE_CFG = "the sampler runs both CFG halves in one batched call, so one step is one transformer call; set False"
PEER_SPECS = {
    "latte-shapes": PeerSpec(
        layer_list="layers",
        # Latte's layers take the text only as cross-attention input and return the hidden states.
        cache_dit_pattern="Pattern_3",
        # TaylorSeer's default patterns (`re.fullmatch("^transformer_blocks.*attn", name)`) match no module of Latte,
        # whose attention layers are `attn1`/`attn2`: it is pointed at whole blocks, the unit our caching skips, and
        # at the attention and feed-forward modules (spatial: attn1, attn2 (cross), ff; temporal: attn1, ff), what
        # its default patterns intend, spelled with Latte's names (the norms and residual additions keep running).
        taylorseer_units=(
            ("blocks", (r"(temporal_)?transformer_blocks\.\d+",)),
            ("attn+ff", (r"(temporal_)?transformer_blocks\.\d+\.(attn1|attn2|ff)",)),
        ),
        pab_ranges=((2, 3, 4), (3, 4, 6), (4, 6, 8)),
        candidates=("FirstBlockCache", "MagCache", "SeaCache", "TextKVCache"),
        not_applicable={
            "cache-dit Pattern_0/1/2 (blocks with an encoder stream)": (
                "Latte's blocks take the text as cross-attention input and return the hidden states only "
                "(Pattern_3); there is no encoder stream to cache"
            ),
            "cache-dit enable_encoder_calibrator": (
                "no encoder stream (Pattern_3), so nothing for it to forecast; set False"
            ),
            "cache-dit enable_separate_cfg": _SEPARATE_CFG,
        },
    ),
    "ltx-textures": PeerSpec(
        layer_list="transformer_blocks",
        # cache-dit's own LTX adapter (`BlockAdapterRegister` "LTX") uses Pattern_2 for LTX-Video: hidden and encoder
        # states in, hidden states out.
        cache_dit_pattern="Pattern_2",
        taylorseer_units=(
            ("blocks", (r"transformer_blocks\.\d+",)),
            ("attn+ff", (r"transformer_blocks\.\d+\.(attn1|attn2|ff)",)),
        ),
        pab_ranges=((2, None, None), (3, None, None), (4, None, None)),
        pab_identifiers={"spatial_attention_block_identifiers": (r"transformer_blocks\.\d+\.attn1$",)},
        faster_cache=False,
        candidates=("FasterCache", "TextKVCache"),
        not_applicable={
            "PAB temporal and cross-attention broadcast": (
                "LTX-Video has no temporal attention (attn1 attends over all video tokens: broadcast as PAB's "
                "spatial attention), and its cross-attention (attn2, an LTXAttention) has no `is_cross_attention` "
                "attribute, by which PAB tells cross- from self-attention; attn2 is left uncached"
            ),
            "cache-dit enable_encoder_calibrator": (
                "LTX-Video's blocks return the hidden states only (Pattern_2): no encoder stream to forecast; set False"
            ),
            "cache-dit enable_separate_cfg": _SEPARATE_CFG,
        },
    ),
}


def peer_spec(testbed_name: str) -> PeerSpec:
    if testbed_name not in PEER_SPECS:
        raise ValueError(
            f"no peer settings for testbed {testbed_name!r} (known: {', '.join(PEER_SPECS)}); add a PeerSpec to "
            "benchmarks/quality/adapters.py"
        )
    return PEER_SPECS[testbed_name]


def layer_stack(testbed) -> torch.nn.Module:
    """The module whose one block list (``peer_spec(...).layer_list``) holds the testbed's whole layers: a
    :class:`LatteLayers` view of Latte, the transformer itself for LTX-Video."""
    if testbed.family.transformer_class == "LatteTransformer3DModel":
        return LatteLayers(testbed.transformer)
    return testbed.transformer


def raw_vision_callback(testbed):
    """SeaCache's ``raw_vision_callback`` for the module :func:`layer_stack` gives (its documented adapter for a
    family without a built-in one)."""
    if testbed.family.transformer_class == "LatteTransformer3DModel":
        return _video_latents
    model = testbed.model_config
    return PackedVideoLatents(model.patch_size_t, model.patch_size)


def noise_levels(testbed, num_steps: int) -> list[float]:
    """The ``sigma`` of each of ``num_steps`` sampler steps, as SeaCache reads it from ``cache_context``: the
    flow-matching sampler's own ``scheduler.sigmas[i]`` (x_t = (1 - sigma) x_0 + sigma noise, what SeaCache's filter
    assumes). For a DDPM-family sampler (x_t = sqrt(a) x_0 + sqrt(1 - a) noise) the flow-matching sigma of the same
    signal-to-noise ratio, sqrt(1 - a) / (sqrt(a) + sqrt(1 - a)): SeaCache's spectral filter depends on the two
    scales only through their ratio (its gain is normalised to unit mean), so this is its filter for that latent."""
    scheduler = testbed.scheduler(num_steps)
    if hasattr(scheduler, "alphas_cumprod"):
        alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps.long()].double()
        signal, noise = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        return (noise / (signal + noise)).tolist()
    return scheduler.sigmas[:num_steps].double().tolist()


def instance_state(module: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, set[str]]]:
    return {id(m): (m, set(vars(m))) for m in module.modules()}


def restore_instance_state(state: dict[int, tuple[torch.nn.Module, set[str]]]) -> None:
    """Delete every instance attribute that appeared on a module since :func:`instance_state` (cache-dit's hooks
    set ``forward``, ``_is_cached``, ``_context_manager``, stats ... on the modules it patches)."""
    for module, names in state.values():
        for name in set(vars(module)) - names:
            del module.__dict__[name]
