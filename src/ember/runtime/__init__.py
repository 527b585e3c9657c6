"""What runs inside the process tree: the root zygote, function zygotes and instances.

Nothing here imports the server's packages, so forked processes stay small.
"""
