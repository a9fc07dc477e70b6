"""``python -m transquant.report``: the study report (:mod:`transquant.studies.report`).

Study names and parent run ids are plain words; every option is a ``key=value`` override, as
for ``transquant.run``:

  tracking.uri          the MLflow store to read (as conf/config.yaml: $MLFLOW_TRACKING_URI, else
                        sqlite:///mlruns/mlflow.db); a sqlite file that does not exist is an error
  tracking.experiment   the experiment to search (null: every experiment of the store)
  report.out            output directory (null: reports/<study>)
  report.all            merge every sweep of the study, not only the latest
  report.log            false: write files only, no artifacts, metrics or tags in MLflow
  report.compare        [A,B]: print A against B, paired per seed on the same examples, instead of
                        the report: two method labels of the study ('W8A8 (paper)') or two run ids
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import DictConfig

from .core import cli

PROG = "transquant.report"


@dataclass
class Options:
    out: Optional[str] = None
    all: bool = False
    log: bool = True
    compare: Optional[List[str]] = None


@dataclass
class Args:
    tracking: cli.Tracking = field(default_factory=cli.Tracking)
    report: Options = field(default_factory=Options)


def run(studies: list[str], cfg: DictConfig) -> int:
    """The report (or the comparison) of ``studies`` from the store of ``cfg.tracking``."""
    from .core.tracking import check_uri, client_for
    from .studies.compare import compare
    from .studies.queries import children_frame, resolve_all
    from .studies.render import compare_markdown
    from .studies.report import report

    uri, opts = cfg.tracking.uri, cfg.report
    if opts.compare is not None and len(opts.compare) != 2:
        raise cli.CliError(f"report.compare={list(opts.compare)}: give two method labels or run ids, "
                           "report.compare=[A,B]")
    if not studies and opts.compare is None:
        raise cli.CliError("give a study name or parent run id (or report.compare=[RUN_ID,RUN_ID])")
    if opts.compare is not None:
        client = client_for(uri, must_exist=True)
        parents = resolve_all(client, studies, cfg.tracking.experiment, opts.all)
        df = children_frame(client, [p.info.run_id for p in parents]) if parents else None
        print(compare_markdown(compare(client, *opts.compare, df), *opts.compare))
        return 0
    check_uri(uri, must_exist=True)
    out = report(studies, uri, opts.out, cfg.tracking.experiment, opts.all, opts.log)
    print(f"report written to {out}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .studies.queries import ReportError

    return cli.main(PROG, Args, run, argv, words="STUDY|PARENT_RUN_ID", description=__doc__, errors=(ReportError,))


if __name__ == "__main__":
    sys.exit(main())
