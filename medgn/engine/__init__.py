"""medgn.engine."""

from medgn.engine.evaluate import evaluate  # noqa: E402,F401  (numpy-only at import; MONAI loads on use)
from medgn.engine.infer import infer  # noqa: E402,F401  (torch at import; MONAI and the data pipeline load on use)
