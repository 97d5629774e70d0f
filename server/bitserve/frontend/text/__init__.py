"""Front-side text handling: incremental detokenization and stop strings (as vLLM's front does)."""
