"""dmlray: distributed deep metric learning.

The library (losses, memory, data, models, evaluation) imports without Ray, boto3 or
prometheus_client; only the modules that exist to use them import them.
"""

__version__ = "0.1.0"
