"""Front ends built on streammem's heads: the Gradio web demo (``demos.app``)."""
