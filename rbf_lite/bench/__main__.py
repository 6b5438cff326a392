"""`python -m rbf_lite.bench`: the attention benchmark (see rbf_lite.bench.attention)."""
from .attention import main

main()
