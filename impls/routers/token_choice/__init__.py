"""Sparse token-choice gating (survey: Token-Choice): a trained gate picks each token's experts."""
