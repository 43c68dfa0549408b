"""What `edgelora serve` allows one request by default: the command's option defaults and
serve.build_app's, named once here, where the CLI can read them without the `serve` extra."""

MAX_TOKENS_LIMIT = 512  # the most tokens one answer may ask for; also what it gets when it asks for none
MAX_REQUEST_BYTES = 2**20  # a larger request body is answered 413
BODY_TIMEOUT_S = 30.0  # a request body must arrive whole within this many seconds (else 408)
