"""``python -m surgery`` (and ``torchrun -m surgery``) run the CLI."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows a busy machine 10-40x

from pathlib import Path

from surgery.storage.trust import drop_implicit_cwd

# ``python -m`` puts the current directory first on sys.path: a stray ``evil.py`` (or a module a
# checkpoint names) must not be importable from there implicitly. The folder this package lives in
# stays (in a checkout it holds ``cli``).
drop_implicit_cwd(keep=Path(__file__).resolve().parent.parent)

try:  # installed (wheel or editable): the CLI lives under the project's name
    from surgery_cli.main import main
except ModuleNotFoundError as e:  # a checkout on PYTHONPATH: the ``cli`` folder itself
    if e.name != "surgery_cli":
        raise
    from cli.main import main  # type: ignore[no-redef]

if __name__ == "__main__":
    main()
