"""``python -m transquant.report``: the study report (:mod:`transquant.studies.report`)."""
import sys

from .studies.report import main

if __name__ == "__main__":
    sys.exit(main())
