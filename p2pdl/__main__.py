"""`python -m p2pdl …` — see p2pdl.cli."""

from p2pdl.cli import main

raise SystemExit(main())
