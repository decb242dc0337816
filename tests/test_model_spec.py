"""The CLI on your own model: MODEL_SPEC (a save_pretrained model directory, a pipeline directory, or
package.module:factory) for inspect / export / build-engines, with example inputs from the pipeline's first
transformer call, a safetensors file or shape flags; the manifest records which."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from tiny_pipelines import tiny_wan_pipeline  # noqa: E402

from adacache_compile import load  # noqa: E402
from adacache_compile.cli import main  # noqa: E402
from adacache_compile.testbed.tiny_models import tiny_model  # noqa: E402

WAN_SHAPES = [
    "--shape",
    "hidden_states=1,4,2,8,8",
    "--shape",
    "timestep=1:int64",
    "--shape",
    "encoder_hidden_states=1,8,16",
]


@pytest.fixture(scope="module")
def wan_pipeline_dir(tmp_path_factory):
    from diffusers import UniPCMultistepScheduler

    path = tmp_path_factory.mktemp("wan") / "pipeline"
    tiny_wan_pipeline(UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction")).save_pretrained(path)
    return path


def tiny_wan_factory():
    """A ``package.module:factory`` for the CLI: a model and example inputs."""
    model = tiny_model("wan")
    generator = torch.Generator().manual_seed(0)
    return model, {
        "hidden_states": torch.randn(1, 4, 2, 8, 8, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=generator),
    }


PROMPT = ["--prompt", "a cat runs on the beach", "--height", "32", "--width", "32", "--num-frames", "5"]


def test_inspect_a_pipeline_directory_from_its_first_transformer_call(wan_pipeline_dir, capsys):
    assert main(["inspect", str(wan_pipeline_dir), *PROMPT]) == 0
    plan = capsys.readouterr().out
    assert "blocks: 2 in 1 stack(s)" in plan and "blocks: 2 x WanTransformerBlock" in plan


def test_export_a_pipeline_directory_records_the_pipeline_call(wan_pipeline_dir, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(wan_pipeline_dir), str(out), *PROMPT, "--config", "slow-30"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["runtime"]["example_inputs"]
    assert source["model"] == {
        "kind": "pipeline_dir",
        "path": str(wan_pipeline_dir),
        "pipeline": "WanPipeline",
        "transformer": "transformer",
    }
    assert source["inputs"].startswith("pipeline call {'prompt': 'a cat runs on the beach'")
    # The pipeline's call: batch 1 per CFG branch, latents of a 32x32, 5-frame video (4 channels, 2 latent frames).
    hidden = next(t for t in manifest["programs"]["full"]["inputs"] if t["name"] == "hidden_states")
    assert hidden["shape"][1:] in ([4, "frames", "height", "width"], [4, 2, 4, 4])
    assert load(out, "onnxruntime").adacache_config.codebook[0] == (0.08, 3)


def test_inspect_a_model_directory_with_shape_flags_and_a_safetensors_file(wan_pipeline_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    model_dir = wan_pipeline_dir / "transformer"
    assert main(["inspect", str(model_dir), *WAN_SHAPES]) == 0
    assert "WanTransformerBlock" in capsys.readouterr().out
    _, inputs = tiny_wan_factory()
    save_file(inputs, tmp_path / "inputs.safetensors")
    assert main(["inspect", str(model_dir), "--inputs", str(tmp_path / "inputs.safetensors")]) == 0
    assert "WanTransformerBlock" in capsys.readouterr().out
    # Its export: test_an_export_is_a_drop_in_for_a_plain_call_of_the_model.


def test_an_export_is_a_drop_in_for_a_plain_call_of_the_model(wan_pipeline_dir, tmp_path):
    """Exported with the CLI from a model directory and a safetensors file of inputs, the loaded runtime takes the
    call a user makes on the model: return_dict at its default (True) gives the model's output class, False its
    tuple; both equal the model's output (the first call computes). Another non-tensor argument is refused by name."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    from adacache_compile.errors import InputMismatchError

    model_dir = wan_pipeline_dir / "transformer"
    _, inputs = tiny_wan_factory()
    save_file(inputs, tmp_path / "inputs.safetensors")
    out = tmp_path / "export"
    assert main(["export", str(model_dir), str(out), "--inputs", str(tmp_path / "inputs.safetensors")]) == 0
    source = json.loads((out / "manifest.json").read_text())["runtime"]["example_inputs"]
    assert source["model"]["kind"] == "model_dir" and source["model"]["class"] == "WanTransformer3DModel"
    assert source["inputs"] == f"safetensors {tmp_path / 'inputs.safetensors'}"
    model = WanTransformer3DModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = model(**inputs)  # return_dict at its default
        runtime = load(out, "onnxruntime")
        with runtime.generation(num_steps=2):
            as_dict = runtime(**inputs)
        with runtime.generation(num_steps=2):
            (as_tuple,) = runtime(**inputs, return_dict=False)
    assert type(as_dict) is type(expected)
    # float32 through onnxruntime against eager torch: kernels sum in another order (1e-4 of the output's range).
    scale = float(expected.sample.abs().max())
    for actual in (as_dict.sample, as_tuple):
        assert float((actual - expected.sample).abs().max()) <= 1e-4 * scale
    with pytest.raises(
        InputMismatchError, match=r"argument 'attention_kwargs': captured None, got a dict with keys \['scale'\]"
    ):
        runtime(**inputs, attention_kwargs={"scale": 0.5})


def test_export_from_a_factory(tmp_path):
    out = tmp_path / "export"
    assert main(["export", "test_model_spec:tiny_wan_factory", str(out)]) == 0
    source = json.loads((out / "manifest.json").read_text())["runtime"]["example_inputs"]
    assert source == {"model": {"kind": "factory", "factory": "test_model_spec:tiny_wan_factory"}, "inputs": "factory"}


def test_build_engines_with_a_model_spec_exports_first(tmp_path, capsys):
    out = tmp_path / "export"
    code = main(["build-engines", "test_model_spec:tiny_wan_factory", str(out)])
    assert (out / "manifest.json").is_file(), "the export ran"
    assert code != 0 and "TensorRT" in capsys.readouterr().err  # no TensorRT on this machine


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "no/such/dir"], "expected a directory written by save_pretrained"),
        (["inspect", "test_model_spec:missing"], "cannot import 'missing'"),
        (["inspect", "test_model_spec:tiny_wan_factory", "--shape", "x=1,a"], r"--shape 'x=1,a': expected NAME=D0"),
    ],
)
def test_bad_model_specs_explain(argv, message):
    with pytest.raises(ValueError, match=message):
        main(argv)


def test_a_model_directory_without_inputs_says_what_to_pass(wan_pipeline_dir):
    with pytest.raises(SystemExit, match=r"no example inputs; pass --prompt .* --inputs FILE.safetensors or --shape"):
        main(["inspect", str(wan_pipeline_dir / "transformer")])
