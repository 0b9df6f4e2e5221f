"""Expert-choice gating (survey: Expert-Choice): each expert picks the tokens it processes."""
