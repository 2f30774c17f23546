"""Export a trained adapter: file formats, the model card and the push to the Hugging Face Hub."""
