"""One file per architecture: Config -> Block -> Model, top to bottom."""
