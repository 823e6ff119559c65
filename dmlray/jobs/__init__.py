"""The Ray layer of training: launching a run with Ray Train, the body of every worker, run
folders, and what the ``dmlray`` commands do (train, eval, demo). Imports Ray."""
