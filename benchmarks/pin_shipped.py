"""Print the pins of tests/test_shipped.py (first six samples and sum of each shipped demo checkpoint's audio).

Runs the test module's own procedure (``shipped_outputs``: one seeded generator draws every checkpoint's mel
in PINS order), so a checkpoint re-exported under an existing name is re-pinned with:

    .venv/bin/python benchmarks/pin_shipped.py            # every name in PINS, in its order
    .venv/bin/python benchmarks/pin_shipped.py --check    # also say which pins differ from the test's

Paste the printed entries into PINS.  A new checkpoint goes at the end of PINS (a name inserted earlier
changes the mel of every name after it); add it there first, with any placeholder value, then run this.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "tests" / "test_shipped.py"


def load_test_module():
    spec = importlib.util.spec_from_file_location("test_shipped", TEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="compare with the pins in tests/test_shipped.py (exit 1 on a difference)")
    args = ap.parse_args(argv)
    mod = load_test_module()
    out = mod.shipped_outputs(list(mod.PINS))
    differ = []
    print("PINS = {  # name: (first six samples, sum of all 2 × 960 or 960 samples)")
    for name, x in out.items():
        head = [float(v) for v in x.flatten()[:6].double()]
        total = float(x.double().sum())
        print(f"    {name!r}: ({head!r}, {total!r}),".replace("'", '"'))
        old_head, old_total = mod.PINS[name]
        if max(abs(a - b) for a, b in zip(head, old_head)) > 1e-6 or not math.isclose(total, old_total, abs_tol=1e-3):
            differ.append(name)
    print("}")
    if args.check:
        print("differ from the test's pins: " + (", ".join(differ) or "none"), file=sys.stderr)
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
