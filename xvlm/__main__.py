"""`python -m xvlm <command>` — see xvlm/cli.py."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
