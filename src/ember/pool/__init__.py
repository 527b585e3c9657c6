"""The server's side of the process tree: root zygote, function zygotes, instances, pools."""
