"""``python -m surgery`` (and ``torchrun -m surgery``) run the CLI."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows a busy machine 10-40x

from cli.main import main  # noqa: E402

if __name__ == "__main__":
    main()
