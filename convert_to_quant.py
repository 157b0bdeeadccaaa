#!/usr/bin/env python3
"""Drop-in for the old ``convert_to_quant`` command line: maps its common flags to ``quantkit
convert``, prints that command and runs it. All logic lives in ``quantkit.compat``.

    python convert_to_quant.py -i model.safetensors -o model-int8.safetensors --int8 --scaling_mode row --simple
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # run from a checkout without installing

from quantkit.compat import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
