"""``python -m transquant.search``: a multirun whose jobs return their objectives (:mod:`transquant.studies.search`)."""
from .studies.search import main

if __name__ == "__main__":
    main()
