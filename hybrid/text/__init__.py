"""Text in and out: the tiktoken tokenizer (tokenizer.py), the checkpoint's chat template (chat_template.py)
with tool declarations (tool_declaration.py), and the parser of the model's output (output_parser.py).
Checked by tests/test_tokenizer.py, tests/test_chat.py, tests/test_parsing.py."""
