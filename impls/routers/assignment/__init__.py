"""Transport and assignment routing (the catalog's Load Balancing extension): balance by an optimization."""
