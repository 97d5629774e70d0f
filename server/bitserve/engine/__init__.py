"""The engine process: owns one copy of the weights. `core` (process main and loop), `workers`
(what it runs per model), `sched/` (policy and step loop), `worker/` (batch, KV cache, model
runner, sampler), `heads/` (encoder task heads). Imports no grpc."""
