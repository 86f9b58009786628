"""``python -m simulations.bench``: the benchmark matrix (:mod:`simulations.bench.matrix`)."""

import sys

from simulations.bench.matrix import main

sys.exit(main())
