"""medgn.data."""
