"""``python -m bench``: run the benchmark and print its report (see :mod:`bench`)."""

from bench.cli import main

raise SystemExit(main())
