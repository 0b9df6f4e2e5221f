"""Soft token merging (survey: Soft, Token Merging): experts process weighted mixtures of tokens."""
