"""The OpenAI-compatible HTTP server: the engine loop in the process that holds the model, the HTTP front-end in a
process of its own (frontend.py), the two talking through two pipes.

command.py      `dsv3 serve`                                          protocol.py  request bodies (pydantic)
frontend.py     serve(): spawns the front-end, runs the engine loop   parsers.py   reasoning, tool calls
openai_api.py   the app: routes, API key, OpenAI error bodies         metrics.py   Prometheus text for GET /metrics
completions.py  requests -> engine sequences -> answers and SSE       messages.py  what goes through the pipes
engine_loop.py  the one thread that owns and steps the engine         client.py    the front-end's end of them

Nothing is imported here, so `dsv3 --help` does not pull in FastAPI.
"""

# The largest request body a server reads (dsv3 serve --max-request-bytes): room for a whole context of 160K tokens
# as token ids, or as text (about 4 characters a token) even if all of it is written in JSON's \uXXXX escapes.
MAX_REQUEST_BYTES = 8 << 20
