"""The interactive X-VLM grounding demo: callbacks (pure, testable), the model registry, and the Gradio page."""
