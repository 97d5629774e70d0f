"""The process boundary: engine core processes own the weights and their scheduler; the front
(gRPC process) talks to each through an `EngineClient`.

protocol (the messages, plain data) - client (front half: spawn, submit, receive, restart) -
core (the engine process: receive, schedule, run, send) - workers (what a core runs for each
model it serves).
"""
