"""Gradio web UI of the stack: uploads studies, queues them, shows results."""
