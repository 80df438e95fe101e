"""medgn.engine."""

from medgn.engine.evaluate import evaluate  # noqa: E402,F401  (numpy-only at import; MONAI loads on use)
