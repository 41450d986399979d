"""`python -m qlora_cli` is the same program as `qlora`, so launchers such as torchrun can start it."""

from qlora_cli.cli import main

if __name__ == "__main__":
    main()
