"""`python -m mmbalance_llm ...` is the `mmbalance` CLI (so `accelerate launch -m mmbalance_llm train R` works)."""
from mmbalance_llm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
