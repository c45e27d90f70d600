"""Keeping the libraries' own messages off a user's terminal.

transformers and torch speak up on stderr by themselves: Python warnings (a FutureWarning
for a deprecated argument, printed on every call) and transformers' own logger, which has
a handler of its own. A newcomer running `python -m storygen` or `python -m bot` should
see a story or our log, not those. Only a `__main__` calls `quiet_libraries()`, once, after
configuring logging (STYLE: only `__main__` configures it):

- warnings become records of the `py.warnings` logger (logging.captureWarnings), shown
  only when debugging;
- transformers' logger hands its records to ours instead of printing them, errors only
  unless debugging.

Tests keep seeing warnings as usual; tests/test_logs.py checks that a forward emits none.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def quiet_libraries(debug: bool = False) -> None:
    """Route library warnings and transformers' logger into the process's logging, quietly."""
    import transformers

    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if debug else logging.ERROR)
    library = transformers.utils.logging
    library.disable_default_handler()
    library.enable_propagation()
    library.set_verbosity(logging.WARNING if debug else logging.ERROR)
    library.disable_progress_bar()
