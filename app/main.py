"""`modron`: the desktop app's entry point."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    # The tray app is built by the desktop-app issue; until then say so instead of failing obscurely.
    sys.stderr.write("modron: the desktop app is not built yet; run `modron-train demo` for the engine's demo\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
