"""`python -m peftc`: the command line."""

from peftc.tools.cli import main

raise SystemExit(main())
