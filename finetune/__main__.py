"""``python -m finetune``: the linear probe (same as ``mae-probe``)."""

from finetune.probe import main

if __name__ == "__main__":
    raise SystemExit(main())
