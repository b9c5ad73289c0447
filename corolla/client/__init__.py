"""The client: keeps embeddings and LM head locally, runs the blocks through servers found in the DHT."""
