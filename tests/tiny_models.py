"""The tiny models live in the package (the CLI and benchmarks use them too)."""

from adacache_compile.testbed.tiny_models import *  # noqa: F403
from adacache_compile.testbed.tiny_models import FAMILIES, TinyVideoDiT, build, example_inputs, tiny_model  # noqa: F401
