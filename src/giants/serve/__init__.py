

# Defaults of `giants serve` (and create_app), here so the CLI can show them without importing FastAPI.
DEFAULT_MAX_QUEUE = 256  # engine requests (one per prompt) that may wait beyond the running batch; more get 429
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds from arrival; then 408 and the request is aborted in the engine
