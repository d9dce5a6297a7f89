"""Images in prompts: what an image is to the engine (inputs), how a model's processor turns
one into placeholder tokens and encoder inputs (processor), and how a request's image URLs
are fetched and decoded safely (media)."""
