"""The evaluate stage (stage.py): metrics on held-out rows per task (metrics.py), generations, and the publish gate."""
