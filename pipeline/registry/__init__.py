"""The registry (store.py: immutable, hash-verified versions on a folder or S3) and the publish stage (publish.py)."""
