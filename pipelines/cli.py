"""How every job ends: a problem the user can fix is one line (`error: ...`) and exit status 2, never a traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable

from configio.errors import UserError


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; resume with train.resume=latest", file=sys.stderr)
        sys.exit(130)
