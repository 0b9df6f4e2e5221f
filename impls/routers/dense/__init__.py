"""Dense gating (survey: Dense): every expert computes every token and a gate weights them."""
