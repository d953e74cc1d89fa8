"""Assets built from packages (teachers, tokenizers, corpora) and the token batches made of them."""
