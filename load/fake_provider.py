"""Run the fake `mitto` provider for benchmarks: `python load/fake_provider.py [flags]`.

A thin wrapper around `python -m sendd.dev.fakeprovider` (same flags; prints `{"port": N}` once
listening), usable without installing the package or setting PYTHONPATH.
"""

import sys
from pathlib import Path

# The package lives in daemon/ next to this directory; benchmarks run from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))

from sendd.dev.fakeprovider import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
