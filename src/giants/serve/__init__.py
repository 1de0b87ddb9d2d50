

# Defaults of `giants serve` (and create_app), here so the CLI can show them without importing FastAPI.
DEFAULT_MAX_QUEUE = 256  # sequences (prompts x n) that may wait beyond the running batch; more get 429
DEFAULT_REQUEST_TIMEOUT = 600.0  # seconds from arrival; then 408 and the request is aborted in the engine
DEFAULT_MAX_SEQS_PER_REQUEST = 128  # prompts x n of one request; more get 400
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 64  # stop strings per request
MAX_STOP_CHARS = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 64  # stop_token_ids per request
# HTTP: a client must send its request headers within DEFAULT_HEADER_TIMEOUT s of connecting (or of the previous
# response) and its body within DEFAULT_BODY_TIMEOUT s of the headers; at most DEFAULT_MAX_CONNECTIONS are open.
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 2048  # lowered to the descriptor limit minus a reserve where that is lower
DEFAULT_KEEP_ALIVE = 65  # seconds an idle keep-alive connection is held (longer than clients pool them: 5 s)
MAX_HEADER_BYTES = 64 * 1024  # request line + headers
# Chat templates come with the checkpoint: rendered in a separate process, within this time and output size.
DEFAULT_TEMPLATE_TIMEOUT = 5.0
MAX_TEMPLATE_CHARS = 16 * 1024 * 1024
