"""``python -m transquant.bench_base``: the profile at BERT-base size (:mod:`transquant.deploy.bench`)."""
import sys

from .deploy.bench import main

if __name__ == "__main__":
    sys.exit(main())
