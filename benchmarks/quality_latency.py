"""Quality against latency on the testbed: AdaCache, static strides and the diffusers cache hooks.

Same as ``adacache-compile bench``; writes JSON, markdown and a Pareto plot to --out (default bench_out/).
"""

import sys

from adacache_compile.cli import main

if __name__ == "__main__":
    sys.exit(main(["-v", "bench", *sys.argv[1:]]))
