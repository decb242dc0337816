"""Foundation contracts on real diffusers video transformers (tiny random configs) and a hand-written DiT:
full == original, skip(deltas of the same step) == full, the skip program runs no op of the cached blocks, every block found,
dynamic batch through one capture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, TinyVideoDiT, build

import adacache_compile as ac
from adacache_compile.config import AdaCacheConfig
from adacache_compile.errors import PassError
from adacache_compile.passes.split_programs import _check_skip_is_free_of_region

EXPECTED_BLOCKS = {
    "tiny-dit": [f"blocks.{i}" for i in range(4)],
    "latte": [
        "transformer_blocks.0",
        "temporal_transformer_blocks.0",
        "transformer_blocks.1",
        "temporal_transformer_blocks.1",
    ],
    "cogvideox": ["transformer_blocks.0", "transformer_blocks.1"],
    "wan": ["blocks.0", "blocks.1"],
    "ltx": ["transformer_blocks.0", "transformer_blocks.1"],
    "hunyuan": [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ],
    "mochi": ["transformer_blocks.0", "transformer_blocks.1"],
    "allegro": ["transformer_blocks.0", "transformer_blocks.1"],
}
# Mochi's forward loops over the batch in Python, so export specialises batch; every other family keeps it dynamic.
STATIC_BATCH = {"mochi"}


def _call_kwargs(family, kwargs):
    return kwargs if family == "tiny-dit" else {**kwargs, "return_dict": False}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    model, kwargs = build(name)
    kwargs = _call_kwargs(name, kwargs)
    cached = ac.optimize(model, AdaCacheConfig.preset("fast-30"), example_inputs=kwargs)
    return name, model, kwargs, cached


def _run_programs(cached, kwargs):
    programs = cached.programs
    inputs = cached.captures.latest().captured.flatten((), kwargs)
    with torch.no_grad():
        full = programs.decode_full(programs.full(*inputs, programs.zero_tap(inputs)))
        skip = programs.skip(*inputs, *full.deltas)
    return full.outputs, full.deltas, skip


def test_full_program_equals_original(family):
    name, model, kwargs, cached = family
    with torch.no_grad():
        reference = model(**kwargs)[0]
    outputs, _, _ = _run_programs(cached, kwargs)
    scale = reference.abs().max().item()
    assert (outputs[0] - reference).abs().max().item() <= 1e-5 * scale


def test_skip_program_with_same_step_deltas_equals_full(family):
    _, _, kwargs, cached = family
    outputs, deltas, skip = _run_programs(cached, kwargs)
    assert len(deltas) == len(cached.programs.delta_names) >= 1
    for a, b in zip(outputs, skip):
        assert torch.equal(a, b)


def test_skip_program_runs_no_op_of_the_cached_blocks(family):
    """Behavioural, not read off the pass's own metadata check: with every parameter of the cached blocks set to NaN
    (the programs share the model's parameters) the full program's outputs turn NaN while the skip program, fed the
    deltas computed before, returns exactly what it returned before."""
    _, model, kwargs, cached = family
    outputs, deltas, skip = _run_programs(cached, kwargs)
    region_params = [p for name in cached.plan.region for p in model.get_submodule(name).parameters()]
    assert region_params, "the cached blocks hold parameters"
    saved = [p.detach().clone() for p in region_params]
    programs = cached.programs
    inputs = cached.captures.latest().captured.flatten((), kwargs)
    try:
        with torch.no_grad():
            for p in region_params:
                p.fill_(float("nan"))
            poisoned_full = programs.decode_full(programs.full(*inputs, programs.zero_tap(inputs)))
            poisoned_skip = programs.skip(*inputs, *deltas)
    finally:
        with torch.no_grad():
            for p, value in zip(region_params, saved):
                p.copy_(value)
    assert not torch.isfinite(poisoned_full.outputs[0]).all()
    for before, after in zip(skip, poisoned_skip):
        assert torch.equal(before, after)


def test_skip_program_is_smaller_than_full_less_the_region(family):
    _, _, _, cached = family
    full_ops = sum(n.op == "call_function" for n in cached.programs.full.graph.nodes)
    skip_ops = sum(n.op == "call_function" for n in cached.programs.skip.graph.nodes)
    region_ops = sum(1 for n in cached.plan.region_nodes if n.op == "call_function")
    assert skip_ops < full_ops - region_ops + 20  # only the stream replay and delta adds are new


def test_region_check_refuses_a_program_that_holds_region_ops(family):
    _, _, _, cached = family
    with pytest.raises(PassError, match=r"skip program still holds node .* of block"):
        _check_skip_is_free_of_region(cached.programs.full, cached.plan)


def test_plan_lists_every_block(family):
    name, _, _, cached = family
    assert cached.plan.blocks == EXPECTED_BLOCKS[name]
    assert cached.plan.region == EXPECTED_BLOCKS[name]
    assert cached.plan.tap is not None and cached.plan.tap.split(":")[0] in cached.plan.region


def test_batch_one_and_two_through_one_capture(family):
    name, _, _, cached = family
    if name in STATIC_BATCH:
        pytest.skip(f"{name} loops over the batch in Python; export specialises the batch size")
    model, kwargs1 = build(name, batch=1, seed=3)
    kwargs1 = _call_kwargs(name, kwargs1)
    model.load_state_dict(cached._orig_mod.state_dict())
    with torch.no_grad():
        reference = model(**kwargs1)[0]
    outputs, _, skip = _run_programs(cached, kwargs1)
    assert len(cached.captures.entries) == 1
    assert (outputs[0] - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    assert torch.equal(outputs[0], skip[0])


def test_drop_in_module_keeps_output_structure():
    model, kwargs = build("latte")
    cached = ac.optimize(model, AdaCacheConfig.preset("fast-30"))
    with cached.generation(num_steps=4):
        out = cached(**kwargs, return_dict=True)
    assert type(out).__name__ == "Transformer2DModelOutput"
    with torch.no_grad():
        assert torch.allclose(out.sample, model(**kwargs).sample, atol=1e-5)


class _PostNormBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.lin(x))


class _PostNormNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_PostNormBlock(8) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class _BranchyBlock(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return x + self.lin(x)
        return x - self.lin(x)


class _BranchyNet(_PostNormNet):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_BranchyBlock(8) for _ in range(3))


@pytest.mark.parametrize(
    "model, match",
    [
        (torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)), "no repeated transformer"),
        (_PostNormNet(), "not layout\\(block input\\) \\+ residual"),
        (_BranchyNet(), "torch.export"),
    ],
    ids=["no-block-stack", "post-norm-blocks", "data-dependent-control-flow"],
)
def test_unsupported_models_are_refused_and_left_working(model, match):
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(ac.UnsupportedModelError, match=match):
        ac.optimize(model, example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_hand_written_dit_region_and_tap_are_configurable():
    model = TinyVideoDiT()
    kwargs = dict(hidden_states=torch.randn(2, 4, 3, 8, 8), timestep=torch.full((2,), 10))
    config = AdaCacheConfig.preset("fast-30").replace(region=(1, 3), tap="blocks.2")
    cached = ac.optimize(model, config, example_inputs=kwargs)
    assert cached.plan.region == ["blocks.1", "blocks.2"]
    assert cached.plan.tap.startswith("blocks.2:")
    outputs, _, skip = _run_programs(cached, kwargs)
    with torch.no_grad():
        reference = model(**kwargs)[0]
    assert (outputs[0] - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    assert torch.equal(outputs[0], skip[0])


def test_programs_copy_no_more_than_the_model():
    """Functionalization's unconditional clones and slice_scatters are undone in the finished programs (Wan's rotary
    embedding writes into an empty_like buffer: eager runs no whole-tensor copy there, neither may we)."""
    model, kwargs = build("wan")
    cached = ac.optimize(model, AdaCacheConfig.preset("fast-30"), example_inputs={**kwargs, "return_dict": False})
    targets = [n.target for n in cached.programs.full.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.slice_scatter.default not in targets
    assert torch.ops.aten.clone.default not in targets
    outputs, _, skip = _run_programs(cached, {**kwargs, "return_dict": False})
    with torch.no_grad():
        reference = model(**kwargs, return_dict=False)[0]
    assert (outputs[0] - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    assert torch.equal(outputs[0], skip[0])
