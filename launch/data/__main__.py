"""``python -m launch.data`` = ``mae-prepare``."""

from launch.data.prepare import main

raise SystemExit(main())
