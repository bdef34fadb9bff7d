"""The replica sidecar: leases chunks from the control plane and runs them on the local engine.

It talks to the control plane over its REST API with the replica token, to the engine over the
OpenAI-compatible HTTP API (vLLM and llama.cpp's ``llama-server`` alike), and to S3 with boto3.
Run it with ``python -m sidecar --help``.
"""
