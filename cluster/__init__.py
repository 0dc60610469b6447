"""The cluster side of the repository that is Python: the local dev stack (`stack.py`,
`python -m cluster.local ...`) and the KubeRay manifest writer (`make_rayjobs.py`)."""
