"""Text towers of image-text teachers (CLIP, SigLIP) and the CLIP tokenizer, for zero-shot
classification through a teacher and through the student standing in for it."""
