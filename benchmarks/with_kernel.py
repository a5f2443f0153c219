"""Run a module or script with the paged decode kernel's module constants set (``llumnix.engine.paged_attention``):
how the GPU scripts measure a candidate constant in the engine before it becomes the default.

    python3 benchmarks/with_kernel.py PARTITION=512 -- -m llumnix.bench.cli bench decode-floor --device cuda ...
    python3 benchmarks/with_kernel.py DYNAMIC_SPLIT=1 -- benchmarks/gpu_step_host.py -o out.csv
"""

from __future__ import annotations

import runpy
import sys

from llumnix.engine import paged_attention


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    for setting in argv[:cut]:
        name, _, value = setting.partition("=")
        if not hasattr(paged_attention, name) or not value.lstrip("-").isdigit():
            raise SystemExit(f"{setting!r}: expected NAME=INT with NAME a constant of llumnix.engine.paged_attention")
        setattr(paged_attention, name, type(getattr(paged_attention, name))(int(value)))
    rest = argv[cut + 1 :]
    if rest[:1] == ["-m"]:
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = rest
        runpy.run_path(rest[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
