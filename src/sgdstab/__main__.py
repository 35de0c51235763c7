"""``python -m sgdstab``: the command line, also as ``torchrun ... -m sgdstab measure ...``."""

from sgdstab.cli import app

if __name__ == "__main__":
    app(prog_name="sgdstab")
