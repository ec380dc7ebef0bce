"""What users run: the `hybrid` command (cli.py), terminal chat, demo, the OpenAI-compatible server (server.py,
openai_protocol.py, engine_thread.py), batch jobs (batch.py) and `hybrid profile` (profile.py).
Checked by tests/test_cli.py, tests/test_server.py, tests/test_batch.py."""
