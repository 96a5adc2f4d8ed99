"""The conductor: the top of tuneloop's import graph, below only the CLI.

`loop.py` is the loop's order (scheduled job -> policy -> trigger -> job -> gate -> promotion -> watch) in one
readable place; `process.py` assembles `serve`, `run` and `exporter` from the parts (which routes and collectors the
gateway gets, what runs beside it); `worker.py` is a retraining job's process; `webhook.py` and `deployment.py` are
the two seams where retraining meets serving. Serving, monitoring and retraining never import each other; they meet
here (docs/architecture.md draws the graph).
"""
