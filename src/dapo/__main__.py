"""`python -m dapo` (and `torchrun ... -m dapo train`): the `dapo` command line."""

from dapo.cli import main

raise SystemExit(main())
