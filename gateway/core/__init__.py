"""Engine cores in their own processes (opt-in: FMGATE_ENGINE_PROCESS=true, `fmgate serve --engine-process`).

- engine_core: one chat model's scheduler and runner in a process, serving over ZeroMQ (python -m gateway.core).
- client: EngineClient, LLMEngine's async API in the API process (tokenization and logprob text stay there).
- supervisor: started by `fmgate serve`; builds/locates each chat model, starts its core, restarts it when
  it dies, and stops every core at shutdown.
- wire: the msgspec structs both sides send.
- embed_core, embed_client, embed_wire: the same three for embedding models (the batcher in the core).
- sockets (the client's socket thread, probe) and core_loop (the core's main loop, main): shared by both.
See docs/processes.md.
"""
