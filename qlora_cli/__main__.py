"""The `qlora` program's entry point (the console script and `python -m qlora_cli`, which launchers
such as torchrun start).

It imports the command line inside a try: Ctrl-C while the libraries are still importing (the
first second or so) would otherwise print a KeyboardInterrupt traceback from deep inside an
import, before cli.main's own handling is in place.
"""

import os
import sys


def _interrupted_in_a_callback(unraisable) -> None:
    """Ctrl-C that lands inside a callback Python runs during an import (a module lock's weakref
    callback) cannot propagate: CPython prints "Exception ignored in ... Traceback ...
    KeyboardInterrupt" and carries on as if no key was pressed. Stop as the press asked, quietly."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)  # inside the callback: raising is what CPython ignores
    sys.__unraisablehook__(unraisable)


def main() -> None:
    sys.unraisablehook = _interrupted_in_a_callback
    try:
        from qlora_cli.cli import main as run

        run()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
