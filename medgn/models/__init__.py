"""medgn.models."""
