"""`python3 -m sandbox ...` is the `sandbox` binary."""
from .cli import main

main()
