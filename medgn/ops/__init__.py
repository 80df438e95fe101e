"""medgn.ops."""
