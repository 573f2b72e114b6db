"""Stage ``params``: check ``params.yaml`` before any stage that reads it runs.

DVC deletes a stage's outputs before it runs the stage's command, so a typo that the stage
itself reports (``train.epocs``) would cost its finished outputs: after the fix, the
stage would run again from scratch. Every stage depends on this one's output, so DVC runs
it first and stops at its one-line error with every other output untouched; once the
file is fixed, nothing that had already run with those params runs again.

The output, ``data/params.checked``, says only that the file passed: its bytes never
change, so a params change reruns just the stages that read the changed keys. It is kept
in git and never deleted by DVC (``cache: false``, ``persist: true``), so every clone has
it and a failing check leaves no tracked file deleted.
"""

from __future__ import annotations

import sys

from imgclf.config import PATHS, load_params, setup_logging, stage_main
from imgclf.files import write_bytes

CHECKED = b"params.yaml passed imgclf/params.py\n"


@stage_main
def main() -> None:
    params = load_params()  # a bad file is one error line (exit 2): see stage_main
    setup_logging(params.base.log_level)
    write_bytes(PATHS.params_checked, CHECKED)


if __name__ == "__main__":
    sys.exit(main())
