"""``python -m surgery`` (and ``torchrun -m surgery``) run the CLI."""

from cli.main import main

if __name__ == "__main__":
    main()
