"""`python -m pearl_edu` is the same as the `pearl-edu` command."""

from pearl_edu.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
