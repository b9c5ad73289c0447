"""OpenAI-compatible HTTP API, web chat and swarm map over a swarm-served model.

Modules, one job each:
  config.py      the API's settings (each default defined once; the CLI is generated from them)
  schemas.py     typed OpenAI request/response shapes (pydantic)
  errors.py      errors in the OpenAI error shape, with their HTTP status codes
  sampling.py    choosing the next token (temperature, top-p, per-request seeded generator)
  detokenize.py  token ids -> text deltas of one choice (incremental decoding, stop sequences)
  jobs.py        OpenAI requests -> generation jobs (chat template, prompt and length checks)
  engine.py      runs jobs on the swarm in worker threads; streams text events
  state.py       the swarm map (servers, spans, coverage, round-trip times) as one typed object
  terminal.py    the swarm map drawn for a terminal (`corolla health`)
  openai_routes.py / web_routes.py / app.py   the FastAPI app; app.py also runs uvicorn in a thread
  chat.py        `corolla chat`: a streaming terminal chat
  commands.py    `corolla api | chat | health`
"""
