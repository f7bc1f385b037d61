"""The flow library on 2-D toys (see :mod:`wavedistill.eval.flows_demo`); same as ``wavedistill flows-demo``.

    python benchmarks/flows_demo.py --out /tmp/flows-demo            # a few minutes on one CPU thread
    python benchmarks/flows_demo.py --out /tmp/flows-demo --quick    # seconds (smoke run)
"""

from __future__ import annotations

import sys

from wavedistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["flows-demo", *sys.argv[1:]]))
