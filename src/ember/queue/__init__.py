"""Async invocations: accepted durably, run through the gateway's one dispatch path, retried,
expired or dead-lettered (docs/async.md). `base` is the backends' protocol and records,
`sqlite` and `nats` the two backends, `policy` the retry decisions as pure functions,
`dispatcher` the loop that runs them and `notify` what is sent when one ends."""
