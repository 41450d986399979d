"""The `qlora` program's entry point (the console script and `python -m qlora_cli`, which launchers
such as torchrun start).

It imports the command line inside a try: Ctrl-C while the libraries are still importing (the
first second or so) would otherwise print a KeyboardInterrupt traceback from deep inside an
import, before cli.main's own handling is in place.
"""

import sys


def main() -> None:
    try:
        from qlora_cli.cli import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
