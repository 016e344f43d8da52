"""Built-in tasks: everything a run needs (data, tokenizer, demonstrations), built locally."""
