"""``python -m cascade``: the ``cascade`` command."""

from cascade.cli import main

raise SystemExit(main())
