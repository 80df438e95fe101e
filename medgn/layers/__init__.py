"""medgn.layers."""
