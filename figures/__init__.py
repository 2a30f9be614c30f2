"""Scripts that regenerate every figure in the README, one command each."""
