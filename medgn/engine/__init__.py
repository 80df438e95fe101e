"""medgn.engine."""
