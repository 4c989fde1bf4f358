"""The global scheduler's policy: pure functions of a load snapshot and a request.

No Ray, no engine imports: the same code runs in the ingress, in unit tests and in the
discrete-event simulator (runtime/scheduler/sim/).
"""
