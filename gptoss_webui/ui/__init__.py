"""The Gradio app: one module per tab, plus the locale tables."""
