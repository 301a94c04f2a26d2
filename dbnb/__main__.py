"""`python -m dbnb` and `accelerate launch -m dbnb ...` enter the same CLI as `dbnb`."""
from dbnb.faces.cli import main

raise SystemExit(main())
