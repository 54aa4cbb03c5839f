"""``python -m slimtrain ...`` is the ``slimtrain`` command."""

from slimtrain.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
